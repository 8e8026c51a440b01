"""Upload an exported folder to the Hugging Face hub: ``create_repo`` then ``upload_folder`` (huggingface_hub),
private unless ``public``.

Refused with one line, before anything is uploaded: a folder that is no ditgraft export (no config.json with an
``auto_map``, no modeling_ditgraft.py), no token (argument, HF_TOKEN or a saved login), and a repository that
already exists with other content (anything beyond .gitattributes / README.md that the export would not
overwrite); pass ``overwrite=True`` to replace an earlier upload of the same model.
"""
from __future__ import annotations

import json
import os

from ditgraft.export.hf import MODULE

ALWAYS_THERE = {".gitattributes", "README.md"}


class PushRefused(ValueError):
    """``push`` would not upload (the message says why)."""


def _hub():
    try:
        import huggingface_hub
    except ImportError as err:
        raise PushRefused("push needs huggingface_hub: pip install huggingface_hub") from err
    return huggingface_hub


def _local_files(folder: str) -> set[str]:
    out = set()
    for root, _dirs, files in os.walk(folder):
        for f in files:
            out.add(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
    return out


def check_export(folder: str) -> None:
    cfg = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not os.path.exists(cfg) or not os.path.exists(os.path.join(folder,
                                                                                           f"{MODULE}.py")):
        raise PushRefused(f"{folder!r} is not a ditgraft export (no config.json and {MODULE}.py); "
                          "write one with `ditgraft export MODEL --out DIR`")
    with open(cfg) as f:
        if "auto_map" not in json.load(f):
            raise PushRefused(f"{cfg} has no auto_map: not a ditgraft export")


def push(folder: str, repo_id: str, public: bool = False, token: str | None = None, overwrite: bool = False,
         commit_message: str = "ditgraft export") -> str:
    """Upload ``folder`` to ``repo_id``; returns the repository URL."""
    check_export(folder)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushRefused(f"repo_id={repo_id!r}: use owner/name")
    hub = _hub()
    token = token or os.environ.get("HF_TOKEN") or hub.get_token()
    if not token:
        raise PushRefused("no hub token: pass --token, set HF_TOKEN or run `huggingface-cli login`")
    api = hub.HfApi(token=token)
    if api.repo_exists(repo_id) and not overwrite:
        remote = set(api.list_repo_files(repo_id))
        other = sorted(remote - _local_files(folder) - ALWAYS_THERE)
        if other:
            raise PushRefused(f"{repo_id} exists with other content ({', '.join(other[:3])}"
                              f"{' ...' if len(other) > 3 else ''}); choose a new repository or pass --overwrite")
    url = api.create_repo(repo_id, private=not public, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message)
    return str(url)
