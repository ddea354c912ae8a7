"""pyiqa networks with random weights, saved in the layout of pyiqa's published checkpoints.

``write_pyiqa_checkpoint(models_dir, metric)`` builds the metric's real architecture with pyiqa
(every download switched off), randomises it from a seed and writes the state dict under
``<models_dir>/pyiqa/<published file name>`` in the published format (a bare state dict for MUSIQ,
``{"params": state_dict}`` for TOPIQ / CNNIQA / WaDIQaM, a ``.mat`` for NIQE, an
``(sv_coef, sv)`` tuple for BRISQUE). The file names and formats are written out here on purpose,
independently of ``versat2i.rewards.pyiqa_metric``, so a wrong name or layout there fails the tests.

Speed does not depend on weight values, so these are the full-size networks: CNNIQA is 3 MB,
MUSIQ 27 M parameters (110 MB), TOPIQ-NR (ResNet-50) 45 M (180 MB).
"""

from __future__ import annotations

from pathlib import Path

import torch

# metric -> (published file name, how the published file nests its state dict, pyiqa build options
# that make it build without downloading)
PUBLISHED = {
    "musiq": ("musiq_koniq_ckpt-e95806b9.pth", None, {"pretrained": False}),
    "musiq-ava": ("musiq_ava_ckpt-e8d3f067.pth", None, {"pretrained": False, "num_class": 10}),
    "topiq_nr": ("cfanet_nr_koniq_res50-9a73138b.pth", "params", {"pretrained": False, "backbone_pretrain": False}),
    "cnniqa": ("CNNIQA_koniq10k-e6f14c91.pth", "params", {"pretrained": None}),
    "wadiqam_nr": ("WaDIQaM-NR-koniq-aaffea29.pth", "params", {"pretrained": False}),
    "niqe": ("niqe_modelparameters.mat", "mat", {}),
    "brisque": ("brisque_svm_weights.pth", "svm", {}),
}
NIQE_FEATURES = 36  # 18 natural-scene statistics at 2 scales
BRISQUE_FEATURES = 36


def checkpoint_path(models_dir: str | Path, metric: str) -> Path:
    return Path(models_dir) / "pyiqa" / PUBLISHED[metric][0]


def build_random_pyiqa_net(metric: str, seed: int = 0) -> torch.nn.Module:
    """The real network of ``metric`` (pyiqa ``InferenceModel.net``), random, eval mode, CPU."""
    import pyiqa

    torch.manual_seed(seed)
    model = pyiqa.create_metric(metric, device=torch.device("cpu"), **PUBLISHED[metric][2])
    with torch.no_grad():
        # pyiqa's init leaves some tensors at constants (norm weights = 1, biases = 0): randomise
        # every float tensor so a load that silently skips a key changes the output.
        generator = torch.Generator().manual_seed(seed)
        for name, tensor in model.net.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * 0.02
                if name.endswith(("running_var",)):
                    tensor.copy_(1.0 + noise.abs())
                elif "weight" in name and tensor.ndim == 1:  # norm scales
                    tensor.copy_(1.0 + noise)
                else:
                    tensor.copy_(noise if tensor.ndim == 1 else tensor + noise)
    return model.net.eval()


def write_pyiqa_checkpoint(models_dir: str | Path, metric: str, seed: int = 0) -> Path:
    """Write a random checkpoint for ``metric`` where the scorer looks for it; returns its path."""
    layout = PUBLISHED[metric][1]
    path = checkpoint_path(models_dir, metric)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    if layout == "mat":
        import numpy as np
        import scipy.io

        features = torch.randn(NIQE_FEATURES, NIQE_FEATURES, generator=generator, dtype=torch.float64)
        covariance = (features @ features.T / NIQE_FEATURES + torch.eye(NIQE_FEATURES, dtype=torch.float64)).numpy()
        mean = torch.rand(1, NIQE_FEATURES, generator=generator, dtype=torch.float64).numpy()
        scipy.io.savemat(str(path), {"mu_prisparam": mean, "cov_prisparam": np.asarray(covariance)})
    elif layout == "svm":
        vectors = 64
        torch.save(
            (torch.randn(vectors, generator=generator, dtype=torch.float64),
             torch.rand(vectors, BRISQUE_FEATURES, generator=generator, dtype=torch.float64)),
            path,
        )
    else:
        state = {k: v.clone() for k, v in build_random_pyiqa_net(metric, seed).state_dict().items()}
        torch.save(state if layout is None else {layout: state}, path)
    return path
