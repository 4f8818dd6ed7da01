"""Where a mask is read from: a local file or folder, or a Hugging Face Hub repository.

A Hub reference uses huggingface_hub's own URI syntax, `hf://[<TYPE>/]<ORG>/<NAME>[@<REVISION>][/<PATH>]`
(`parse_hf_uri`; TYPE is `datasets`, `spaces`, ... and defaults to a model repository):

- `hf://org/name`: `fish_mask.safetensors` at the root of the repository's main branch;
- `hf://org/name@v1/run-3`: the `fish_mask.safetensors` in folder `run-3`, at revision `v1` (a
  branch, tag or commit; `refs/pr/N` works verbatim, other revisions with `/` are written `%2F`);
- `hf://org/name/masks/sst2.safetensors`: that file (a PATH ending in `.safetensors` is a file,
  any other PATH a folder holding `fish_mask.safetensors`).

Only `hf://` means the Hub, so a local path is never mistaken for a repository. The file is
fetched with `huggingface_hub.hf_hub_download`: it lands in, and is reused from, the ordinary Hub
cache (`HF_HUB_CACHE` / `HF_HOME`), `HF_HUB_OFFLINE=1` reads only that cache, and `HF_TOKEN` and
`HF_ENDPOINT` apply as for any Hub download. The downloaded file is then read exactly like a
local one (`FishMask.load`: safetensors only, never pickle; bool tensors only).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

from axolotl_fish.config import HUB_PREFIX, check_hub_reference
from axolotl_fish.masks.file import MASK_FILENAME, FishMask

# What a download can raise besides a missing file: an HTTP error, the endpoint refusing or
# unreachable (httpx; huggingface_hub may surface it as a RuntimeError of its closed client).
_DOWNLOAD_ERRORS = (
    EntryNotFoundError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    httpx.HTTPError,
    OSError,
    RuntimeError,
)


def is_hub_reference(source: str | os.PathLike[str]) -> bool:
    """True for `hf://...`, the only spelling that means the Hub."""
    return str(source).startswith(HUB_PREFIX)


def download_hub_mask(reference: str) -> Path:
    """The local (cached) path of the mask file `reference` names; errors name the reference."""
    uri = check_hub_reference(reference)
    path = uri.path_in_repo.strip("/")
    if not path.endswith(".safetensors"):
        path = f"{path}/{MASK_FILENAME}" if path else MASK_FILENAME
    subfolder, _, filename = path.rpartition("/")
    try:
        local = hf_hub_download(
            uri.id,
            filename,
            subfolder=subfolder or None,
            repo_type=uri.type,
            revision=uri.revision,
        )
    except _DOWNLOAD_ERRORS as err:
        where = f"file {path!r} in the {uri.type} repository {uri.id!r}, revision "
        where += repr(uri.revision or "main")
        if constants.is_offline_mode():
            why = f"HF_HUB_OFFLINE is set, so only the local Hub cache ({constants.HF_HUB_CACHE}) "
            why += "was read."
        elif isinstance(err, EntryNotFoundError):
            why = "The Hub has no such file."
        else:
            why = f"The Hub endpoint {constants.ENDPOINT} could not be read."
        detail = " ".join(f"{type(err).__name__}: {err}".split())  # one line
        raise FileNotFoundError(f"No FISH mask at {reference} ({where}). {why} {detail}") from err
    return Path(local)


def load_mask(source: str | os.PathLike[str]) -> FishMask:
    """Read a mask from a local file or folder, or from a Hub reference (`hf://...`)."""
    if not is_hub_reference(source):
        return FishMask.load(source)
    reference = str(source)
    path = download_hub_mask(reference)
    try:
        return FishMask.load(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{reference}: {err}") from err
