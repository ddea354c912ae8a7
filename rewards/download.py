"""Download a missing weight file from the Hugging Face Hub, when the user asked for it (Load Scorers'
'download missing weights'; off by default: the pack never downloads on its own).

huggingface_hub does the transfer: its progress bar (``tqdm_class``, which also reports to the
caller and lets it cancel), resume (a dropped connection is retried with a Range request from where
it stopped), and writing under a temporary name moved to the final one only once complete (a
cancelled or failed download leaves nothing under the final name). What it does not do for a fresh
download is check the content, so that is done here: the file's sha256 must equal the one the Hub
publishes for it (the ETag of an LFS file); a file that differs is deleted and the download is an
error.

``HF_HUB_OFFLINE=1`` (read by huggingface_hub) turns every download off; ``HF_ENDPOINT`` (also
huggingface_hub's) points it at a mirror.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from ..safe_io import readable_name, sha256_file
from .weights import HUB_FILES, HubFile, MissingWeightsError

logger = logging.getLogger(__name__)

SHA256 = re.compile(r"[0-9a-f]{64}")
ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes in all); may raise to cancel


@readable_name
class DownloadError(RuntimeError):
    """A download failed or gave a file that is not the published one; the message names the file,
    the URL and what to do."""


def hub_offline() -> bool:
    """huggingface_hub's own switch (``HF_HUB_OFFLINE``), as it read it at import."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def downloadable(relative_path: str) -> HubFile | None:
    """Where the missing file ``relative_path`` is published, or None when it can't be downloaded."""
    return HUB_FILES.get(relative_path)


def download_weight_file(relative_path: str, models_dir: str | Path, *,
                         progress: ProgressCallback | None = None) -> Path:
    """Fetch ``relative_path`` (a key of ``weights.HUB_FILES``) into ``models_dir`` and return its
    path. Raises DownloadError when downloads are off (``HF_HUB_OFFLINE``), the transfer fails, or
    the file's sha256 is not the published one (the file is then deleted)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    source = HUB_FILES.get(relative_path)
    if source is None:
        raise DownloadError(f"{relative_path!r} is not a file the pack knows how to download")
    target = Path(models_dir) / relative_path
    url = hf_hub_url(source.repo_id, source.filename, revision=source.revision)  # on HF_ENDPOINT's host
    if hub_offline():
        raise DownloadError(f"can't download {relative_path!r}: HF_HUB_OFFLINE is set, which turns downloads off; "
                            f"unset it, or download {url} yourself into {target.parent}")
    try:
        expected = get_hf_file_metadata(url).etag or ""
        logger.info("downloading %s from %s into %s", relative_path, url, target.parent)
        path = Path(hf_hub_download(source.repo_id, source.filename, revision=source.revision,
                                    local_dir=target.parent, tqdm_class=_progress_bar(progress)))
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as exc:
        raise DownloadError(f"downloading {relative_path!r} from {url} failed ({type(exc).__name__}: {exc}); "
                            f"queue again to retry, or download the file yourself into {target.parent}") from exc
    if SHA256.fullmatch(expected):  # an LFS file: the Hub publishes its sha256
        actual = sha256_file(path)
        if actual != expected:
            path.unlink(missing_ok=True)
            raise DownloadError(f"the file downloaded from {url} has sha256 {actual}, not the published {expected}; "
                                "it was deleted: queue again to download it again")
    else:  # a small file kept in git: huggingface_hub checked its size
        logger.info("%s: the Hub publishes no sha256 for it (not an LFS file); size checked", url)
    return path


def find_or_download(find: Callable[[], object], models_dir: str | Path, *, download: bool,
                     progress: ProgressCallback | None = None, max_files: int = 8):
    """``find()`` (e.g. building a scorer), downloading each missing weight file it reports (a
    ``MissingWeightsError`` naming a downloadable file) and trying again, when ``download`` is on.
    A file that can't be downloaded, or ``download`` off, re-raises the MissingWeightsError."""
    fetched: set[str] = set()
    while True:
        try:
            return find()
        except MissingWeightsError as exc:
            if not download or exc.relative_path in fetched or downloadable(exc.relative_path) is None \
                    or len(fetched) >= max_files:
                raise
            fetched.add(exc.relative_path)
            download_weight_file(exc.relative_path, models_dir, progress=progress)


def _progress_bar(progress: ProgressCallback | None):
    """huggingface_hub's tqdm class, also reporting each update to ``progress`` (which may raise to
    cancel: huggingface_hub then deletes its temporary file)."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    if progress is None:
        return hub_tqdm

    class ReportingBar(hub_tqdm):
        # Counted here: a disabled tqdm (no terminal, HF_HUB_DISABLE_PROGRESS_BARS) does not count.
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.done, self.size = int(kwargs.get("initial") or 0), int(kwargs.get("total") or 0)

        def update(self, n=1):
            shown = super().update(n)
            self.done += int(n or 0)
            progress(self.done, self.size)
            return shown

    return ReportingBar
