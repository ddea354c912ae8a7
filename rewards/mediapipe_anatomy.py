"""Geometry (anatomy) scorer: how plausible the human bodies and hands in an image are, from
MediaPipe's pose and hand landmarks. Scorer id ``mediapipe-anatomy``; optional extra
``comfyui-versat2i[geometry]`` (``mediapipe==0.10.14``, the last release that ships its pose and
hand models inside the wheel, so nothing is downloaded).

What the score is (docs/geometry-scorer.md has the user-facing version):

1. MediaPipe Pose (static-image mode, model complexity 1) finds the most prominent person and
   MediaPipe Hands (static-image mode, up to ``max_num_hands``) finds hands. Both give metric 3-D
   "world" landmarks; the checks use those, so a limb seen at an angle is not judged by its
   foreshortened 2-D length.
2. A landmark is *usable* when MediaPipe's visibility is at least ``min_visibility`` and it lies
   inside the frame (hand landmarks have no visibility: inside the frame is enough). A check runs
   only when every landmark it reads is usable; guessed, out-of-frame limbs are not judged.
3. Each check turns one measurement into a value in [0, 1] with a soft band: 1 inside
   ``[low, high]``, ``exp(-(d / softness)^2)`` at a distance ``d`` outside it. The checks (tables
   ``BODY_CHECKS`` / ``HAND_CHECKS`` below) are
   - body: left/right length agreement of upper arms, forearms, thighs and shins; forearm/upper
     arm, shin/thigh, upper arm/shoulder width, thigh/torso and hip/shoulder width ratios;
     elbow and knee angles (a joint folded tighter than it can bend);
   - hand: proximal/middle and middle/distal phalanx ratios of each finger, each finger's and the
     thumb's length against the palm, knuckle (MCP), PIP and DIP angles, the evenness of the
     knuckle spacing, and MediaPipe's handedness confidence.
4. A part (the body, each hand) scores ``0.5 * mean + 0.5 * min`` of its checks, so a single
   broken limb costs at least half of the part's score; the image scores the same combination over
   its parts. Images with nothing to judge (no person, or a face close-up with no usable limb and
   no hand) are marked *not judged* (``judge_batch``'s mask, stored per image in the score
   table) and get the placeholder score ``no_person_score`` (default 0.0): the filter never keeps
   them for the geometry aspect, so a candidate whose person is too mangled to be detected is
   never picked, and a prompt showing nobody adds no geometry training image. A judged image
   whose score happens to equal ``no_person_score`` is an ordinary judged image.

The band limits are MediaPipe-specific, not anatomy-table values: MediaPipe's landmarks are joint
estimates (its "PIP to DIP" is not a phalanx bone) and its depth is approximate. They were set by
measuring MediaPipe's own output on ~90 people and ~24 hands in generated images (the 5th-95th
percentiles, widened), and checked against human anthropometry (e.g. the forearm is 0.7-0.9 of
the upper arm, the shin 0.8-1.0 of the thigh). Hand-written because no library scores landmark
plausibility; MediaPipe only supplies the landmarks.

Batch independence: MediaPipe processes one image at a time in static-image mode (no tracking,
no smoothing, no state carried between images), and the checks are pure functions of one image's
landmarks, so a score never depends on the batch.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..safe_io import sha256_file
from .base import Scorer, ScoringBatch
from .registry import ScorerOptions
from .weights import combine_hashes

logger = logging.getLogger(__name__)

EXTRA_HINT = (
    "the geometry scorer 'mediapipe-anatomy' needs the optional extra: "
    "pip install 'comfyui-versat2i[geometry]' (mediapipe==0.10.14, Apache-2.0; later mediapipe "
    "releases no longer ship the pose and hand models inside the wheel)"
)

# The bundled models the two graphs load at model complexity 1 (checked with strace on 0.10.14):
# their sha256 is the scorer's weights hash.
MODEL_FILES = (
    "modules/pose_detection/pose_detection.tflite",
    "modules/pose_landmark/pose_landmark_full.tflite",
    "modules/palm_detection/palm_detection_full.tflite",
    "modules/hand_landmark/hand_landmark_full.tflite",
)
# Pose complexity 0 and 2 would download their models at construction: only 1 is bundled.
POSE_MODEL_COMPLEXITY = 1
HAND_MODEL_COMPLEXITY = 1


# -- the plausibility maths (pure numpy, no mediapipe) -----------------------------------------

@dataclass(frozen=True)
class Band:
    """Plausible range of a measurement: 1 inside ``[low, high]``, a Gaussian fall-off of width
    ``softness`` outside."""

    low: float
    high: float
    softness: float

    def __call__(self, value: float) -> float:
        if not math.isfinite(value):
            return 0.0
        distance = max(self.low - value, 0.0, value - self.high)
        return math.exp(-((distance / self.softness) ** 2))


# A point is a landmark index, or a tuple of indices meaning their midpoint.
Point = int | tuple[int, ...]
# A path is a sequence of points; its length is the sum of its segment lengths.
LandmarkPath = tuple[Point, ...]


@dataclass(frozen=True)
class Check:
    """One plausibility measurement.

    kind ``ratio``: length(paths[0]) / length(paths[1]); ``evenness``: min / max of the path
    lengths (1 when they are equal: left/right symmetry, knuckle spacing); ``angle``: the angle in
    degrees at ``points[1]`` between ``points[0]`` and ``points[2]`` (180 = straight).
    """

    name: str
    kind: str
    refs: tuple
    band: Band

    def landmarks(self) -> set[int]:
        found: set[int] = set()

        def visit(ref):
            if isinstance(ref, int):
                found.add(ref)
            else:
                for item in ref:
                    visit(item)

        visit(self.refs)
        return found


def _point(landmarks: np.ndarray, ref: Point) -> np.ndarray:
    if isinstance(ref, int):
        return landmarks[ref]
    return landmarks[list(ref)].mean(axis=0)


def _path_length(landmarks: np.ndarray, path: LandmarkPath) -> float:
    points = [_point(landmarks, ref) for ref in path]
    return float(sum(np.linalg.norm(b - a) for a, b in itertools.pairwise(points)))


def _angle_degrees(landmarks: np.ndarray, a: Point, b: Point, c: Point) -> float:
    u = _point(landmarks, a) - _point(landmarks, b)
    v = _point(landmarks, c) - _point(landmarks, b)
    norm = float(np.linalg.norm(u) * np.linalg.norm(v))
    if norm <= 0.0:
        return float("nan")
    return math.degrees(math.acos(max(-1.0, min(1.0, float(u @ v) / norm))))


def measure(check: Check, landmarks: np.ndarray) -> float:
    """The raw measurement of ``check`` on ``landmarks`` [N, 3] (NaN when degenerate)."""
    if check.kind == "angle":
        return _angle_degrees(landmarks, *check.refs)
    lengths = [_path_length(landmarks, path) for path in check.refs]
    if check.kind == "ratio":
        return lengths[0] / lengths[1] if lengths[1] > 0 else float("nan")
    if check.kind == "evenness":
        return min(lengths) / max(lengths) if max(lengths) > 0 else float("nan")
    raise ValueError(f"unknown check kind {check.kind!r}")


def run_checks(checks: Sequence[Check], landmarks: np.ndarray, usable: np.ndarray) -> dict[str, float]:
    """Value in [0, 1] of every check whose landmarks are all usable, keyed by check name."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    usable = np.asarray(usable, dtype=bool)
    return {
        check.name: check.band(measure(check, landmarks))
        for check in checks
        if all(usable[i] for i in check.landmarks())
    }


def combine(values: Iterable[float]) -> float | None:
    """Half the mean, half the worst: one bad part or check costs at least half the score."""
    values = list(values)
    if not values:
        return None
    return 0.5 * (sum(values) / len(values)) + 0.5 * min(values)


# MediaPipe Pose landmark indices.
NOSE = 0
SIDES = {
    "left": {"shoulder": 11, "elbow": 13, "wrist": 15, "hip": 23, "knee": 25, "ankle": 27},
    "right": {"shoulder": 12, "elbow": 14, "wrist": 16, "hip": 24, "knee": 26, "ankle": 28},
}
_L, _R = SIDES["left"], SIDES["right"]
SHOULDERS = (_L["shoulder"], _R["shoulder"])
HIPS = (_L["hip"], _R["hip"])

SYMMETRY = Band(0.75, 1.0, 0.15)


def _body_checks() -> tuple[Check, ...]:
    checks = [
        Check(f"symmetry.{limb}", "evenness", ((_L[a], _L[b]), (_R[a], _R[b])), SYMMETRY)
        for limb, (a, b) in {
            "upper_arm": ("shoulder", "elbow"), "forearm": ("elbow", "wrist"),
            "thigh": ("hip", "knee"), "shin": ("knee", "ankle"),
        }.items()
    ]
    for side, j in SIDES.items():
        checks += [
            Check(f"{side}.forearm_to_upper_arm", "ratio",
                  ((j["elbow"], j["wrist"]), (j["shoulder"], j["elbow"])), Band(0.6, 1.35, 0.2)),
            Check(f"{side}.shin_to_thigh", "ratio",
                  ((j["knee"], j["ankle"]), (j["hip"], j["knee"])), Band(0.6, 1.35, 0.2)),
            Check(f"{side}.upper_arm_to_shoulder_width", "ratio",
                  ((j["shoulder"], j["elbow"]), SHOULDERS), Band(0.4, 1.1, 0.2)),
            Check(f"{side}.thigh_to_torso", "ratio",
                  ((j["hip"], j["knee"]), (SHOULDERS, HIPS)), Band(0.45, 1.1, 0.2)),
            # An elbow bends at most ~150 degrees, a knee ~160: a tighter fold is a broken joint.
            Check(f"{side}.elbow_angle", "angle", (j["shoulder"], j["elbow"], j["wrist"]), Band(30, 180, 15)),
            Check(f"{side}.knee_angle", "angle", (j["hip"], j["knee"], j["ankle"]), Band(20, 180, 15)),
        ]
    checks.append(Check("hip_to_shoulder_width", "ratio", (HIPS, SHOULDERS), Band(0.45, 1.0, 0.2)))
    return tuple(checks)


BODY_CHECKS = _body_checks()

# MediaPipe Hands landmark indices: wrist 0, then (MCP/CMC, PIP/MCP, DIP/IP, tip) per finger.
WRIST = 0
FINGERS = {
    "thumb": (1, 2, 3, 4),
    "index": (5, 6, 7, 8),
    "middle": (9, 10, 11, 12),
    "ring": (13, 14, 15, 16),
    "pinky": (17, 18, 19, 20),
}
PALM = (WRIST, FINGERS["middle"][0])  # wrist to middle-finger knuckle
FINGER_TO_PALM = {
    "index": Band(0.55, 1.1, 0.15),
    "middle": Band(0.65, 1.25, 0.15),
    "ring": Band(0.6, 1.15, 0.15),
    "pinky": Band(0.4, 0.95, 0.15),
}


def _hand_checks() -> tuple[Check, ...]:
    checks = []
    for finger, band in FINGER_TO_PALM.items():
        mcp, pip, dip, tip = FINGERS[finger]
        checks += [
            Check(f"{finger}.proximal_to_middle", "ratio", ((mcp, pip), (pip, dip)), Band(0.6, 1.9, 0.3)),
            Check(f"{finger}.middle_to_distal", "ratio", ((pip, dip), (dip, tip)), Band(0.65, 1.7, 0.3)),
            Check(f"{finger}.length_to_palm", "ratio", ((mcp, pip, dip, tip), PALM), band),
            # Flexion limits: MCP ~90-100 degrees, PIP ~110, DIP ~80-90 (interior angle = 180 - flexion).
            Check(f"{finger}.mcp_angle", "angle", (WRIST, mcp, pip), Band(60, 180, 20)),
            Check(f"{finger}.pip_angle", "angle", (mcp, pip, dip), Band(55, 180, 20)),
            Check(f"{finger}.dip_angle", "angle", (pip, dip, tip), Band(90, 180, 20)),
        ]
    cmc, mcp, ip, tip = FINGERS["thumb"]
    checks += [
        Check("thumb.proximal_to_distal", "ratio", ((mcp, ip), (ip, tip)), Band(0.9, 1.7, 0.25)),
        Check("thumb.length_to_palm", "ratio", ((cmc, mcp, ip, tip), PALM), Band(0.7, 1.2, 0.15)),
        Check("thumb.mcp_angle", "angle", (cmc, mcp, ip), Band(100, 180, 20)),
        Check("thumb.ip_angle", "angle", (mcp, ip, tip), Band(100, 180, 20)),
        Check("knuckle_spacing", "evenness",
              tuple((FINGERS[a][0], FINGERS[b][0]) for a, b in
                    (("index", "middle"), ("middle", "ring"), ("ring", "pinky"))),
              Band(0.45, 1.0, 0.15)),
    ]
    return tuple(checks)


HAND_CHECKS = _hand_checks()
HANDEDNESS_CONFIDENCE = Band(0.8, 1.0, 0.25)


@dataclass
class AnatomyReport:
    """Everything behind one image's score: per-check values in [0, 1] for the body and each
    hand, each part's score, and the image score."""

    score: float
    person_found: bool
    body: dict[str, float] = field(default_factory=dict)
    hands: list[dict[str, float]] = field(default_factory=list)
    part_scores: list[float] = field(default_factory=list)


def body_check_values(world: np.ndarray, usable: np.ndarray) -> dict[str, float]:
    """Body checks on MediaPipe Pose world landmarks [33, 3] (metres) with a usable mask [33]."""
    return run_checks(BODY_CHECKS, world, usable)


def hand_check_values(world: np.ndarray, usable: np.ndarray, handedness_score: float | None = None) -> dict[str, float]:
    """Hand checks on MediaPipe Hands world landmarks [21, 3] (metres) with a usable mask [21]."""
    values = run_checks(HAND_CHECKS, world, usable)
    if handedness_score is not None and values:
        values["handedness_confidence"] = HANDEDNESS_CONFIDENCE(float(handedness_score))
    return values


# A part is judged only with enough evidence: one or two body checks (a face close-up shows a
# shoulder line and little else) or a hand mostly out of frame say little about anatomy, and
# MediaPipe's false detections on flowers, animals or a close-up eye usually yield that few.
MIN_BODY_CHECKS = 3
MIN_HAND_CHECKS = 10


def anatomy_report(
    body: Mapping[str, float] | None, hands: Sequence[Mapping[str, float]], *, no_person_score: float
) -> AnatomyReport:
    """Combine per-part check values into the image score (``no_person_score`` with no part)."""
    parts = [dict(body)] if body and len(body) >= MIN_BODY_CHECKS else []
    parts += [dict(hand) for hand in hands if len(hand) >= MIN_HAND_CHECKS]
    part_scores = [combine(part.values()) for part in parts]
    score = combine(part_scores)
    return AnatomyReport(
        score=no_person_score if score is None else score,
        person_found=score is not None,
        body=dict(body or {}),
        hands=[dict(hand) for hand in hands],
        part_scores=part_scores,
    )


def _in_frame(image_landmarks: np.ndarray) -> np.ndarray:
    xy = image_landmarks[:, :2]
    return np.all((xy >= 0.0) & (xy <= 1.0), axis=1)


# -- MediaPipe ---------------------------------------------------------------------------------

def _import_mediapipe():
    try:
        import mediapipe
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != "mediapipe":
            raise ImportError(
                f"mediapipe is installed but failed to import ({exc}); reinstall it with "
                "pip install 'comfyui-versat2i[geometry]' (it pins protobuf<5)"
            ) from exc
        raise ImportError(EXTRA_HINT) from exc
    return mediapipe


def bundled_model_paths(mediapipe_root: Path) -> tuple[Path, ...]:
    paths = tuple(mediapipe_root / rel for rel in MODEL_FILES)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"mediapipe at {mediapipe_root} has no bundled model(s) {missing}; this scorer needs "
            "mediapipe==0.10.14 (later releases download models instead): "
            "pip install 'comfyui-versat2i[geometry]'"
        )
    return paths


@contextlib.contextmanager
def _quiet_protobuf():
    """mediapipe 0.10.14 calls a protobuf API that protobuf 4 deprecates, warning on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"SymbolDatabase\.GetPrototype\(\) is deprecated")
        yield


class MediaPipeAnatomyScorer(Scorer):
    """Anatomy plausibility in [0, 1] from MediaPipe pose + hand landmarks (module docstring)."""

    scorer_id = "mediapipe-anatomy"
    aspect = "geometry"
    chunk_size = 16
    may_leave_unjudged = True

    def __init__(
        self,
        *,
        no_person_score: float = 0.0,
        min_visibility: float = 0.5,
        min_detection_confidence: float = 0.5,
        max_num_hands: int = 4,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(device)
        self.mediapipe = _import_mediapipe()
        # The placeholder score of an image with nothing to judge (judge_batch marks it unjudged).
        self.no_person_score = float(no_person_score)
        self.min_visibility = float(min_visibility)
        self.min_detection_confidence = float(min_detection_confidence)
        self.max_num_hands = int(max_num_hands)
        self._model_paths = bundled_model_paths(Path(self.mediapipe.__file__).parent)
        # Hashed now, with the files the graphs will read, not when a manifest asks.
        self._weights_hash = combine_hashes({path.name: sha256_file(path) for path in self._model_paths})
        # MediaPipe graphs are not thread-safe; ComfyUI runs one prompt at a time, the lock
        # covers a CLI or server that scores from several threads.
        self._lock = threading.Lock()
        self._pose = None
        self._hands = None

    @property
    def weights_hash(self) -> str:
        return self._weights_hash

    def weight_files(self) -> tuple[Path, ...]:
        return self._model_paths

    def describe(self) -> dict[str, Any]:
        # The detection settings change the scores (and no_person_score the placeholders), so they are
        # recorded with them.
        return {**super().describe(), "no_person_score": self.no_person_score, "min_visibility": self.min_visibility,
                "min_detection_confidence": self.min_detection_confidence, "max_num_hands": self.max_num_hands}

    def _graphs(self):
        """Build the two MediaPipe graphs once, on first use (each takes ~0.1 s)."""
        if self._pose is None:
            solutions = self.mediapipe.solutions
            with _quiet_protobuf():
                self._pose = solutions.pose.Pose(
                    static_image_mode=True, model_complexity=POSE_MODEL_COMPLEXITY,
                    enable_segmentation=False, min_detection_confidence=self.min_detection_confidence,
                )
                self._hands = solutions.hands.Hands(
                    static_image_mode=True, model_complexity=HAND_MODEL_COMPLEXITY,
                    max_num_hands=self.max_num_hands, min_detection_confidence=self.min_detection_confidence,
                )
        return self._pose, self._hands

    def close(self) -> None:
        """Release the MediaPipe graphs (they are rebuilt on the next call)."""
        with self._lock:
            for graph in (self._pose, self._hands):
                if graph is not None:
                    graph.close()
            self._pose = self._hands = None

    def report(self, image: np.ndarray) -> AnatomyReport:
        """Score one RGB uint8 image [H, W, 3] and say why."""
        with self._lock:
            pose, hands = self._graphs()
            with _quiet_protobuf():
                pose_result = pose.process(image)
                hand_result = hands.process(image)
        body = None
        if pose_result.pose_world_landmarks is not None:
            on_image = np.array([[p.x, p.y, p.visibility] for p in pose_result.pose_landmarks.landmark])
            world = np.array([[p.x, p.y, p.z] for p in pose_result.pose_world_landmarks.landmark])
            usable = (on_image[:, 2] >= self.min_visibility) & _in_frame(on_image)
            body = body_check_values(world, usable)
        hand_values = []
        for on_image_hand, world_hand, handedness in zip(
            hand_result.multi_hand_landmarks or (),
            hand_result.multi_hand_world_landmarks or (),
            hand_result.multi_handedness or (),
        ):
            on_image = np.array([[p.x, p.y] for p in on_image_hand.landmark])
            world = np.array([[p.x, p.y, p.z] for p in world_hand.landmark])
            hand_values.append(
                hand_check_values(world, _in_frame(on_image), handedness.classification[0].score)
            )
        return anatomy_report(body, hand_values, no_person_score=self.no_person_score)

    def judge_batch(self, batch: ScoringBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores, and True for the images with a person (a body or hand with enough evidence)."""
        # MediaPipe takes one uint8 RGB image at a time. Rounding (not truncating) to 8 bits makes
        # an image loaded from a PNG (k / 255) come back as exactly k.
        pixels = (batch.images.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
        reports = [self.report(np.ascontiguousarray(image)) for image in pixels]
        return (torch.tensor([r.score for r in reports], dtype=torch.float32),
                torch.tensor([r.person_found for r in reports], dtype=torch.bool))

    def score_batch(self, batch: ScoringBatch) -> torch.Tensor:
        return self.judge_batch(batch)[0]


def _option(extra: Mapping[str, Any], name: str, default: float, low: float, high: float, *,
            integer: bool = False) -> float | int:
    value = extra.get(name, default)
    kind = "an integer" if integer else "a number"
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and low <= value <= high and (not integer or float(value).is_integer())
    if not valid:
        raise ValueError(f"mediapipe-anatomy option {name}={value!r}: expected {kind} in [{low}, {high}]")
    return int(value) if integer else float(value)


OPTIONS = ("no_person_score", "min_visibility", "min_detection_confidence", "max_num_hands")


def make_scorer(options: ScorerOptions) -> MediaPipeAnatomyScorer:
    """Factory for ``mediapipe-anatomy``. ``options.extra`` may set ``no_person_score`` (0..1,
    default 0.0: the placeholder score of an unjudged image), ``min_visibility`` (0..1, 0.5),
    ``min_detection_confidence`` (0..1, 0.5) and ``max_num_hands`` (1..16, 4). MediaPipe runs on
    the CPU whatever ``options.device`` says."""
    options.check_extra(OPTIONS, MediaPipeAnatomyScorer.scorer_id)
    extra = options.extra
    return MediaPipeAnatomyScorer(
        no_person_score=_option(extra, "no_person_score", 0.0, 0.0, 1.0),
        min_visibility=_option(extra, "min_visibility", 0.5, 0.0, 1.0),
        min_detection_confidence=_option(extra, "min_detection_confidence", 0.5, 0.0, 1.0),
        max_num_hands=_option(extra, "max_num_hands", 4, 1, 16, integer=True),
        device=options.device,
    )
