"""rewards/base.py + registry.py + cache.py: validation, chunking, device handling, the registry
and its scorer cache, with a small pure-torch scorer (no weights)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from versat2i.aspects import ASPECTS
from versat2i.rewards import cache, registry
from versat2i.rewards.base import ImageBatchError, Scorer, ScoringBatch, check_images, score_aspects
from versat2i.rewards.registry import DEFAULT_SCORERS, SCORERS, ScorerEntry, ScorerOptions, get_scorer, list_scorers


class MeanColourScorer(Scorer):
    """Score = weighted mean colour, per image; counts its calls."""

    scorer_id = "test-mean-colour"
    aspect = "aesthetics"
    chunk_size = 3

    def __init__(self, weights=(1.0, 2.0, 3.0), device="cpu"):
        super().__init__(device)
        self.weights = torch.tensor(weights)
        self.calls: list[int] = []
        self.moves: list[str] = []

    def to(self, device):
        self.moves.append(str(device))
        return super().to(device)

    @property
    def weights_hash(self) -> str:
        return "none"

    def score_batch(self, batch: ScoringBatch) -> torch.Tensor:
        self.calls.append(len(batch))
        return (batch.images.mean(dim=(1, 2)) * self.weights.to(batch.images.device)).sum(-1)


class PromptLengthScorer(MeanColourScorer):
    scorer_id = "test-prompt-length"
    aspect = "alignment"
    needs_prompts = True

    def score_batch(self, batch: ScoringBatch) -> torch.Tensor:
        self.calls.append(len(batch))
        return torch.tensor([float(len(p)) for p in batch.prompts])


def _images(count=7, height=16, width=12, seed=0):
    return torch.rand(count, height, width, 3, generator=torch.Generator().manual_seed(seed))


# -- validation ----------------------------------------------------------------------------------

BAD_INPUTS = {
    "empty batch": (lambda: torch.rand(0, 16, 16, 3), 0, "batch is empty"),
    "prompt count": (lambda: _images(3), 2, r"2 prompt\(s\) for 3 image\(s\)"),
    "NaN pixels": (lambda: _images(3).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))), 3,
                   r"NaN or inf pixels in image\(s\) \[1\]"),
    "inf pixels": (lambda: _images(3).index_put_((torch.tensor([2]),), torch.tensor(float("inf"))), 3,
                   r"NaN or inf pixels in image\(s\) \[2\]"),
    "RGBA": (lambda: torch.rand(2, 16, 16, 4), 2, "RGBA"),
    "grayscale": (lambda: torch.rand(2, 16, 16, 1), 2, "grayscale"),
    "channels first": (lambda: torch.rand(2, 3, 16, 16), 2, "channels-first"),
    "3-D": (lambda: torch.rand(16, 16, 3), 16, "3-D tensor"),
    "uint8": (lambda: (torch.rand(2, 16, 16, 3) * 255).to(torch.uint8), 2, "divide uint8"),
    "range -1..1": (lambda: torch.rand(2, 16, 16, 3) * 2 - 1, 2, r"rescale from -1..1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_before_anything_is_computed(case):
    make, prompt_count, message = BAD_INPUTS[case]
    scorer = MeanColourScorer()
    with pytest.raises(ImageBatchError, match=message):
        scorer.score(make(), ["a prompt"] * prompt_count)
    assert scorer.calls == []


def test_single_string_prompt_is_refused():
    with pytest.raises(ImageBatchError, match="single string"):
        check_images(_images(3), "abc")


def test_empty_prompt_is_refused_only_for_scorers_that_read_prompts():
    images = _images(3)
    prompts = ["a cat", "  ", "a dog"]
    assert score_aspects({"aesthetics": MeanColourScorer()}, images, prompts)["aesthetics"].shape == (3,)
    reader = PromptLengthScorer()
    other = MeanColourScorer()
    with pytest.raises(ImageBatchError, match=r"prompt\(s\) \[1\] are empty.*alignment \(test-prompt-length\)"):
        score_aspects({"aesthetics": other, "alignment": reader}, images, prompts)
    assert reader.calls == [] and other.calls == []


# -- chunking and independence ---------------------------------------------------------------------

def test_chunking_never_changes_a_score_and_reports_progress():
    images, prompts = _images(7), [f"p{i}" for i in range(7)]
    scorer = MeanColourScorer()
    progress = []
    whole = scorer.score(images, prompts, chunk_size=7)
    chunked = scorer.score(images, prompts, chunk_size=3, progress=lambda done, total: progress.append((done, total)))
    assert torch.equal(whole, chunked)
    assert progress == [(3, 7), (6, 7), (7, 7)]
    assert scorer.calls == [7, 3, 3, 1]
    alone = torch.cat([scorer.score(images[i:i + 1], prompts[i:i + 1]) for i in range(7)])
    torch.testing.assert_close(alone, whole, rtol=0, atol=1e-6)
    assert whole.dtype == torch.float32 and whole.device.type == "cpu"


def test_score_aspects_default_chunk_is_the_smallest_scorer_chunk():
    a, b = MeanColourScorer(), PromptLengthScorer()
    b.chunk_size = 2
    score_aspects({"aesthetics": a, "alignment": b}, _images(5), ["x"] * 5)
    assert a.calls == [2, 2, 1] and b.calls == [2, 2, 1]


def test_a_scorer_returning_the_wrong_count_or_non_finite_values_is_caught():
    class Broken(MeanColourScorer):
        def score_batch(self, batch):
            return torch.zeros(len(batch) + 1)

    class NaNs(MeanColourScorer):
        def score_batch(self, batch):
            return torch.full((len(batch),), float("nan"))

    with pytest.raises(RuntimeError, match="returned 4 scores for 3 images"):
        Broken().score(_images(3), ["x"] * 3)
    with pytest.raises(RuntimeError, match="non-finite scores"):
        NaNs().score(_images(3), ["x"] * 3)


def test_no_scorer_or_bad_chunk_size_is_a_value_error():
    with pytest.raises(ValueError, match="no scorer given"):
        score_aspects({}, _images(2), ["x", "y"])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        score_aspects({"a": MeanColourScorer()}, _images(2), ["x", "y"], chunk_size=-1)


# -- device handling -------------------------------------------------------------------------------

def test_offload_moves_to_cpu_but_keeps_the_target_device_and_scoring_moves_back():
    scorer = MeanColourScorer(device="cpu")
    scorer.device = torch.device("meta")  # a non-CPU target, without needing an accelerator
    scorer.offload()
    assert scorer.moves == ["cpu"] and scorer.device == torch.device("meta")
    scorer.prepare()
    assert scorer.moves == ["cpu", "meta"]


# -- registry --------------------------------------------------------------------------------------

def test_every_aspect_has_a_registered_default():
    assert set(DEFAULT_SCORERS) == set(ASPECTS)
    for name in DEFAULT_SCORERS.values():
        assert registry.split_name(name)[0] in SCORERS


def test_unknown_scorer_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        get_scorer("laion-aesthetics-v9")
    assert "laion-aesthetic-v2" in str(info.value) and "clip-score" in str(info.value)
    assert "clip-iqa" in list_scorers() and "pyiqa:musiq" in list_scorers()


def test_unknown_options_are_refused_with_the_accepted_ones():
    options = ScorerOptions(extra={"clip_wieghts": "x"})
    with pytest.raises(ValueError, match="unknown option.*clip_wieghts.*accepts clip_architecture, clip_weights"):
        options.check_extra(("clip_weights", "clip_architecture"), "clip-score")


@pytest.fixture
def test_scorer_registered(monkeypatch):
    built = []

    def factory(options):
        scorer = MeanColourScorer(device=options.device)
        scorer.options = options
        built.append(scorer)
        return scorer

    module = type(sys)("versat2i_test_scorer_module")
    module.make_scorer = factory
    monkeypatch.setitem(sys.modules, "versat2i_test_scorer_module", module)
    monkeypatch.setitem(SCORERS, "test-mean-colour", ScorerEntry("versat2i_test_scorer_module:make_scorer",
                                                                 "aesthetics", "test"))
    cache.SCORERS.clear()
    yield built
    cache.SCORERS.clear()


def test_get_scorer_is_cached_per_name_dirs_device_and_options(test_scorer_registered, tmp_path):
    built = test_scorer_registered
    first = get_scorer("test-mean-colour", search_dirs=[tmp_path])
    assert get_scorer("test-mean-colour", search_dirs=[tmp_path]) is first
    assert get_scorer("test-mean-colour", search_dirs=[tmp_path / "other"]) is not first
    assert get_scorer("test-mean-colour", search_dirs=[tmp_path], flavour="x") is not first
    assert get_scorer("test-mean-colour", search_dirs=[tmp_path], cache=False) is not first
    assert len(built) == 4
    assert first.options.search_dirs == (tmp_path,)
    assert get_scorer("test-mean-colour", search_dirs=[tmp_path], pairs=[["a", "b"]]) is \
        get_scorer("test-mean-colour", search_dirs=[tmp_path], pairs=[["a", "b"]])


def test_cached_scorer_is_rebuilt_when_its_weight_file_changes(test_scorer_registered, tmp_path):
    weight = tmp_path / "w.bin"
    weight.write_bytes(b"v1")
    MeanColourScorer.weight_files = lambda self: (weight,)
    try:
        first = get_scorer("test-mean-colour", search_dirs=[tmp_path])
        assert get_scorer("test-mean-colour", search_dirs=[tmp_path]) is first
        weight.write_bytes(b"version 2")
        second = get_scorer("test-mean-colour", search_dirs=[tmp_path])
        assert second is not first
        assert get_scorer("test-mean-colour", search_dirs=[tmp_path]) is second
    finally:
        del MeanColourScorer.weight_files


def test_cache_offload_and_clear(test_scorer_registered, tmp_path):
    scorer = get_scorer("test-mean-colour", search_dirs=[tmp_path])
    cache.offload()
    assert scorer.moves == ["cpu"] and scorer.device == torch.device("cpu")
    cache.clear()
    assert len(cache.SCORERS) == 0 and len(cache.MODELS) == 0
    assert get_scorer("test-mean-colour", search_dirs=[tmp_path]) is not scorer


def test_model_cache_shares_one_load_per_key_and_reloads_on_a_new_stamp():
    models = cache.ModelCache("test")
    loads = []
    first = models.get_or_load("k", lambda: loads.append(1) or object(), stamp=1)
    assert models.get_or_load("k", lambda: loads.append(1) or object(), stamp=1) is first
    assert models.get_or_load("k", lambda: loads.append(1) or object(), stamp=2) is not first
    assert len(loads) == 2 and models.loads == 2


def test_importing_the_package_loads_no_model_library():
    code = (
        "import sys, versat2i.rewards as r, versat2i.rewards.registry, versat2i.rewards.weights, "
        "versat2i.rewards.cache\n"
        "r.get_scorer; r.Scorer; r.MissingWeightsError\n"
        "heavy = [m for m in ('open_clip', 'transformers', 'pyiqa', 'mediapipe', 'diffusers',\n"
        "                     'versat2i.rewards.pyiqa_metric', 'versat2i.rewards.analytic') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_registry_variants_are_the_scorer_modules_own_tables():
    # The registry lists variants as literals (importing it imports no scorer module); they must
    # stay exactly what the factories accept, or Load Scorers would offer a wrong list.
    from versat2i.rewards import analytic, pyiqa_metric  # neither imports pyiqa at import time

    assert tuple(SCORERS["pyiqa"].variants) == tuple(pyiqa_metric.supported_metrics())
    assert tuple(SCORERS["analytic"].variants) == tuple(analytic.STATISTICS)
    assert "analytic:exposure" in list_scorers() and "pyiqa:niqe" in list_scorers()


@pytest.mark.parametrize("name", ["clip-score:large", "laion-aesthetic-v2:v3", "mediapipe-anatomy:hands",
                                  "hps-v2.1:x", "pickscore-v1:x", "clip-iqa:prompts-0123abcd"])
def test_a_variant_of_a_scorer_without_variants_is_refused_before_any_file_lookup(name, tmp_path):
    with pytest.raises(ValueError, match="has no variants"):
        get_scorer(name, search_dirs=[tmp_path / "nothing-here"], cache=False)


class SometimesBlindScorer(MeanColourScorer):
    """Judges only images whose red mean is above 0.5; the others get the placeholder 0.0."""

    scorer_id = "test-sometimes-blind"
    aspect = "geometry"
    may_leave_unjudged = True

    def judge_batch(self, batch):
        scores = self.score_batch(batch)
        judged = batch.images[..., 0].mean(dim=(1, 2)) > 0.5
        return torch.where(judged, scores, torch.zeros_like(scores)), judged


def test_judged_masks_travel_from_the_scorer_to_the_score_table():
    from versat2i.rewards.score_table import ScoreTable

    images = _images(7)
    images[[1, 4], ..., 0] = 0.0  # nothing to judge in these two
    images[[0, 2, 3, 5, 6], ..., 0] = 1.0
    scorers = {"geometry": SometimesBlindScorer(), "aesthetics": MeanColourScorer()}
    result = score_aspects(scorers, images, ["p"] * 7)
    expected = [True, False, True, True, False, True, True]
    assert result.judged["geometry"].tolist() == expected
    assert result.judged["aesthetics"].tolist() == [True] * 7  # a scorer without judge_batch judges everything
    alone = [score_aspects(scorers, images[i:i + 1], ["p"]).judged["geometry"].item() for i in range(7)]
    assert alone == expected  # per image, like the scores
    table = ScoreTable.from_scores(result, scorers, ["p"] * 7)
    assert table.judged["geometry"] == expected and table.judged["aesthetics"] == [True] * 7
    assert table.scorers["geometry"] == {"id": "test-sometimes-blind", "weights_hash": "none"}
    # The plain scores of a scorer that may leave images unjudged lose the mask: refused.
    with pytest.raises(ValueError, match="no judged flags were given"):
        ScoreTable.from_scores(dict(result), scorers, ["p"] * 7)
    # The simple contract is unchanged: score() returns the scores.
    assert torch.equal(scorers["geometry"].score(images, ["p"] * 7), result["geometry"])


def test_a_bad_judged_mask_is_caught():
    class WrongMask(SometimesBlindScorer):
        def judge_batch(self, batch):
            return self.score_batch(batch), torch.ones(len(batch))  # floats, not bools

    with pytest.raises(RuntimeError, match="judge_batch must return one bool per image"):
        score_aspects({"geometry": WrongMask()}, _images(3), ["x"] * 3)
