"""`train.push_to_hub: OWNER/NAME`: the run's export uploaded to the Hugging Face Hub after it is on disk.

After the export (`final/`, and `best/` with `train.keep_best`), process 0 uploads `final/` to the
revision `train.hub_revision` (the main branch when empty) and `best/` to the revision `best` (or
`<hub_revision>-best`), creating the repository (`train.hub_private`) and the branches when missing.
Each export's model card is written again first with the hub id in its loading code (`jdpo.train.model_card`).
The token is huggingface_hub's own: `HF_TOKEN`, or a `hf auth login`; a run asking for the upload
without one is refused before the model loads (`check_token`).

Failures: a transient one (no connection, a timeout, HTTP 408 / 429 / 5xx) is retried (`ATTEMPTS`
tries, waiting `BACKOFF_S` x 2^k between them); the last one, or a permanent one (no permission, an
invalid name, offline mode), is a `HubUploadError` naming the repository, the cause and the export
directories, which stay on disk as they were written: the `jdpo` command then exits with status 4
(`EXIT_UPLOAD_FAILED`), the run's checkpoints and exports intact. `upload_to_hub` is the one call that
reaches the network (a test replaces it); what it is given (`HubUpload`: folder, revision, repository
settings, commit message) is built before it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import huggingface_hub
import jax
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from jdpo import paths
from jdpo.config import Config, ConfigError
from jdpo.errors import HubUploadError
from jdpo.train.model_card import ModelCard, write_card

log = logging.getLogger(__name__)

ATTEMPTS = 4
BACKOFF_S = 5.0
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class HubUpload:
    """One folder to one revision of a model repository."""

    repo_id: str
    folder: str  # a local directory
    revision: str | None  # None: the main branch
    private: bool
    commit_message: str


def check_token(config: Config) -> None:
    """Before the model loads: a run that will upload needs a Hugging Face token (HF_TOKEN or a login)."""
    if config.train.push_to_hub and not huggingface_hub.get_token():
        raise ConfigError(
            f"train.push_to_hub={config.train.push_to_hub!r}: no Hugging Face token; set HF_TOKEN, or run "
            "`hf auth login` on this machine, before the run (or leave train.push_to_hub empty)"
        )


def revisions(config: Config) -> tuple[str | None, str]:
    """(the revision of final/ (None: main), the revision of best/)."""
    rev = config.train.hub_revision or None
    return rev, f"{rev}-best" if rev else "best"


def plan(config: Config, final_dir, best_dir, *, step: int, best_step: int | None) -> list[HubUpload]:
    """The uploads of a run's exports (local directories: see `local_copy`)."""
    t = config.train
    final_rev, best_rev = revisions(config)
    out = [HubUpload(t.push_to_hub, os.fspath(final_dir), final_rev, t.hub_private,
                     f"jdpo: {', '.join(config.dpo.loss_type)} policy after step {step}")]  # fmt: skip
    if best_dir is not None:
        out.append(HubUpload(t.push_to_hub, os.fspath(best_dir), best_rev, t.hub_private,
                             f"jdpo: best eval checkpoint (step {best_step}, {t.keep_best})"))  # fmt: skip
    return out


def upload_to_hub(upload: HubUpload) -> str:
    """The network call: the repository and the branch made when missing, then the folder uploaded as one
    commit. Returns the commit's URL."""
    api = huggingface_hub.HfApi()
    api.create_repo(upload.repo_id, private=upload.private, exist_ok=True, repo_type="model")
    if upload.revision is not None:
        api.create_branch(upload.repo_id, branch=upload.revision, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=upload.repo_id, folder_path=upload.folder, revision=upload.revision,
                             commit_message=upload.commit_message, repo_type="model")  # fmt: skip
    return str(getattr(info, "commit_url", info))


def is_transient(e: BaseException) -> bool:
    """A failure worth another try: no connection, a timeout, HTTP 408 / 429 / 5xx."""
    if isinstance(e, OfflineModeIsEnabled):
        return False
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return status is None or status in TRANSIENT_STATUS
    return isinstance(e, OSError | ConnectionError | TimeoutError)


def with_retries(call: Callable[[], str], what: str, *, attempts: int, backoff_s: float) -> str:
    """`call()`, again after a transient failure (waiting backoff_s, then twice as long, ...)."""
    for k in range(attempts):
        try:
            return call()
        except Exception as e:
            if not is_transient(e) or k == attempts - 1:
                raise
            wait = backoff_s * 2**k
            log.warning("%s failed (%s: %s); trying again in %.0f s (%d of %d)", what, type(e).__name__, e,
                        wait, k + 2, attempts)  # fmt: skip
            time.sleep(wait)
    raise AssertionError("unreachable")


def local_copy(directory) -> tuple[str, bool]:
    """(a local directory with `directory`'s files, whether it is a temporary copy to remove): an
    export on an object store is copied down first."""
    if paths.is_local(directory):
        return os.fspath(directory), False
    tmp = tempfile.mkdtemp(prefix="jdpo-hub-")
    src = paths.as_path(directory)
    for f in src.rglob("*"):
        if f.is_file():
            dst = os.path.join(tmp, os.fspath(f.relative_to(src)))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as out:
                out.write(f.read_bytes())
    return tmp, True


def push(
    config: Config,
    card: ModelCard,
    final_dir,
    best_dir=None,
    *,
    lora_run: bool,
    best_step: int | None = None,
    attempts: int | None = None,
    backoff_s: float | None = None,
) -> list[str]:
    """Upload the exports (process 0; the others return []): each card written with the hub id, then
    each folder with retries. Returns the commit URLs; raises `HubUploadError` when an upload fails."""
    if jax.process_index() != 0:
        return []
    t = config.train
    attempts = ATTEMPTS if attempts is None else attempts
    backoff_s = BACKOFF_S if backoff_s is None else backoff_s
    urls = []
    kind = "adapter" if lora_run else "model"
    for upload in plan(config, final_dir, best_dir, step=card.step, best_step=best_step):
        folder, temporary = local_copy(upload.folder)
        try:
            best = upload.revision == revisions(config)[1]
            name = t.push_to_hub + (f"@{upload.revision}" if upload.revision else "")
            write_card(folder, card, kind, t.push_to_hub, best=best, revision=upload.revision)
            local = HubUpload(upload.repo_id, folder, upload.revision, upload.private, upload.commit_message)
            try:
                url = with_retries(lambda u=local: upload_to_hub(u), f"uploading {upload.folder} to {name}",
                                   attempts=attempts, backoff_s=backoff_s)  # fmt: skip
            except Exception as e:
                exports = ", ".join(os.fspath(d) for d in (final_dir, best_dir) if d)
                later = f"hf upload {t.push_to_hub} {upload.folder}" + (
                    f" --revision {upload.revision}" if upload.revision else ""
                )
                raise HubUploadError(
                    f"train.push_to_hub: uploading {upload.folder} to {name} failed ({type(e).__name__}: "
                    f"{e}); the exports are on disk ({exports}): upload them later with `{later}`"
                ) from e
            log.info("uploaded %s to %s: %s", upload.folder, name, url)
            urls.append(url)
        finally:
            if temporary:
                shutil.rmtree(folder, ignore_errors=True)
    return urls
