"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, nothing else.

Saving builds the directory beside its destination and swaps it into place, so an interrupted
save leaves the previous adapter or the new one, never a mix. Loading parses and checks
everything (schema, method, names, every tensor's key, shape, dtype and finiteness) before the
model changes; any problem raises :class:`AdapterLoadError` and leaves the model untouched.
No pickle is ever read.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from peftlab.config import check_value, clip
from peftlab.distributed import check_whole, clean_name, submodule
from peftlab.errors import AdapterLoadError, AdapterSaveError, ConfigError, PeftlabError
from peftlab.heads import check_label_names, label_names, pooling_of, set_label_names

if TYPE_CHECKING:
    from peftlab.adapter_set import Adapter, AdapterSet

FORMAT = "peftlab-adapter"
FORMAT_VERSION = 2  # 2: the extras' key is "extras" (1: "extra_modules")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
EXTRA = "extra."  # key prefix of the extra modules' tensors (the head saved with an adapter)


# ---- atomic writes: files and directories, one mechanism --------------------------------------
def write_atomic(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename: readers never see half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so that the rename that publishes it
    cannot reach the disk before its contents."""
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            file = Path(folder) / name
            if file.is_file() and not file.is_symlink():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _swap_in(new: Path, path: Path) -> None:
    """Put directory ``new`` at ``path``; a directory already there is swapped out, then deleted."""
    if path.exists():
        if not _exchange(new, path):
            # No atomic exchange here: keep the old copy until the new one is in place.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(new, path)
            new = old
        shutil.rmtree(new, ignore_errors=True)  # after the exchange: the old directory
    else:
        os.replace(new, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def replacing_dir(path: Path) -> Iterator[Path]:
    """Directories' :func:`write_atomic`: the block fills the yielded temporary sibling of
    ``path``, which then replaces ``path`` in one rename. If the block fails, the sibling is
    removed and ``path`` is untouched; readers see the old directory or the new one, never a mix."""
    path = Path(path).parent.resolve() / Path(path).name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_adapter_dir(path: Path) -> bool:
    """A directory that holds nothing but adapter files (peftlab's or peft's)."""
    allowed = {CONFIG_FILE, WEIGHTS_FILE, "README.md"}
    return path.is_dir() and all(p.name in allowed for p in path.iterdir())


def write_dir_atomic(path: Path, files: dict[str, bytes | dict[str, torch.Tensor]]) -> Path:
    """Write ``files`` (bytes, or tensors for safetensors) as directory ``path`` in one step.
    An existing directory is replaced only if it holds nothing but adapter files."""
    path = Path(path)
    if path.exists() and not is_adapter_dir(path):
        raise AdapterSaveError(
            f"{path} exists and holds files that are not an adapter's; refusing to replace it. "
            "Choose an empty or new directory.")
    parent = path.parent.resolve()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapterSaveError(f"cannot write to {parent}: {e}") from None
    try:
        with replacing_dir(path) as tmp:
            for name, content in files.items():
                if isinstance(content, bytes):
                    (tmp / name).write_bytes(content)
                else:
                    save_file(content, str(tmp / name))
    except OSError as e:
        raise AdapterSaveError(f"saving to {path} failed: {e}") from None
    return path


# ---- reading, with validation -----------------------------------------------------------------
def read_config(path: Path) -> dict[str, Any]:
    """The JSON object in ``path/adapter_config.json``, checked for size and form."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterLoadError(f"{path} is not a directory; pass the adapter's directory")
    file = path / CONFIG_FILE
    if not file.is_file():
        pickles = [p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
        raise AdapterLoadError(f"{file} is missing{hint}")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterLoadError(f"{file} is larger than {MAX_CONFIG_BYTES} bytes; not an adapter config")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:  # e.g. a link to /proc/self/mem
        raise AdapterLoadError(f"cannot read {file}: {e}") from None
    except (ValueError, RecursionError) as e:  # ValueError: bad UTF-8, bad JSON, a 5000-digit number
        raise AdapterLoadError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{file} must hold a JSON object")
    if data.get("format") == FORMAT and data.get("format_version") == 1 and "extra_modules" in data:
        # Version 1 named the extras (modules trained and saved with the adapter) "extra_modules".
        data["extras"] = data.pop("extra_modules")
    return data


def read_tensors(path: Path, expected: dict[str, tuple[int, ...]],
                 unread: str | None = None) -> dict[str, torch.Tensor]:
    """Read ``path/adapter_model.safetensors`` and check it holds exactly ``expected``
    (key -> shape) as finite floating-point tensors; keys starting with ``unread`` may be there
    too, and are not read."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise AdapterLoadError(f"{file} is missing (only safetensors weights are loaded)")
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = {k for k in f.keys() if unread is None or not k.startswith(unread)}
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or extra:
                raise AdapterLoadError(
                    f"{file} does not match the adapter's config: missing {missing[:5]}"
                    f"{'...' if len(missing) > 5 else ''}, unexpected {clip(str(extra[:5]))}"
                    f"{'...' if len(extra) > 5 else ''}")
            out = {}
            for key, shape in expected.items():
                sl = f.get_slice(key)
                if tuple(sl.get_shape()) != tuple(shape):
                    raise AdapterLoadError(f"{file}: tensor {key!r} has shape "
                                           f"{tuple(sl.get_shape())}, the model needs {tuple(shape)}")
                if sl.get_dtype() not in ("F16", "BF16", "F32", "F64"):
                    raise AdapterLoadError(f"{file}: tensor {key!r} has dtype {sl.get_dtype()}, "
                                           "expected a floating-point type")
                t = f.get_tensor(key)
                if not torch.isfinite(t).all():
                    raise AdapterLoadError(f"{file}: tensor {key!r} holds NaN or infinite values")
                out[key] = t
            return out
    except PeftlabError:
        raise
    except Exception as e:  # safetensors reports corrupt files with several exception types
        raise AdapterLoadError(f"{file} is not a valid safetensors file: {clip(str(e))}") from None


# ---- peftlab's own format ---------------------------------------------------------------------
def fingerprint(model: torch.nn.Module, adapters: AdapterSet) -> dict[str, Any]:
    """What identifies the base model: its type, size and a hash of its parameter shapes (with
    the names it has unwrapped, so that an FSDP1-wrapped model gives the same hash)."""
    own = {id(p) for n in adapters.names for p in adapters.parameters(n)}
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if id(p) not in own:
            h.update(f"{clean_name(name).replace('.base.', '.')}:{tuple(p.shape)};".encode())
    return {
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "parameters": adapters.base_parameters(),
        "shape_sha256": h.hexdigest(),
    }


def adapter_tensors(adapters: AdapterSet, name: str) -> dict[str, torch.Tensor]:
    """Tensors of adapter ``name`` keyed ``<module>.<param>``; shared ones as ``shared.<param>``."""
    return _piece_tensors(adapters[name])


def _extra_tensors(model: torch.nn.Module, modules: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
    """The state of the extra modules saved with an adapter (its head), keyed ``extra.<module>.<key>``."""
    return {f"{EXTRA}{module}.{clean_name(key)}": t for module in modules
            for key, t in submodule(model, module).state_dict().items()}


def _piece_tensors(adapter: Adapter, pieces: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    # state_dict() tensors share storage with the parameters, so loading can copy into them.
    out: dict[str, torch.Tensor] = {}
    for module, piece in (adapter.pieces if pieces is None else pieces).items():
        for key, t in piece.state_dict().items():
            out[key if key.startswith("shared.") else f"{module}.{key}"] = t
    return out


def _verify_shared(adapter: Adapter, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Let the adapter's shared module refuse the file before anything is copied: it may define
    ``verify_file(saved)``, ``saved`` being the file's ``shared.*`` tensors without that prefix, and
    raise :class:`ConfigError` (VeRA checks that projections regenerated from a seed are the
    ones the adapter was trained with)."""
    verify = getattr(adapter.shared, "verify_file", None)
    if verify is None:
        return
    try:
        verify({k[len("shared."):]: t for k, t in tensors.items() if k.startswith("shared.")})
    except ConfigError as e:
        raise AdapterLoadError(f"{path}: {e}") from None


def adapter_files(adapters: AdapterSet, name: str, extras: tuple[str, ...] | None,
                  fold: bool = False) -> dict[str, bytes | dict[str, torch.Tensor]]:
    """The two files of adapter ``name``: its config as JSON bytes and its tensors. ``fold``: as
    the method saves it for use (:attr:`peftlab.methods.Method.fold`: prefix tuning drops its
    training-only MLP); otherwise as it trains (checkpoints to resume from)."""
    from peftlab import __version__
    from peftlab.methods import method_for

    adapter = adapters[name]
    extras = adapter.extras if extras is None else adapters.resolve_modules(tuple(extras))
    folder = method_for(adapter.config).fold
    saved_config, pieces = folder(adapter) if fold and folder else (adapter.config, adapter.pieces)
    tensors = _piece_tensors(adapter, pieces) | _extra_tensors(adapters.model, extras)
    check_whole(tensors)  # a sharded model's slice is never written as if it were the adapter
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftlab_version": __version__,
        "name": name,
        "method": adapter.config.method,
        "config": saved_config.to_dict(),
        "base_model": fingerprint(adapters.model, adapters),
        "target_modules": [s.module for s in adapter.sites],
        "extras": list(extras),
    }
    if adapter.members:  # a fusion: its members are separate adapters, loaded before it
        config["members"] = list(adapter.members)
    if pooling_of(adapters.model) != "cls":  # the head reads the backbone another way (heads.py)
        config["head"] = {"pooling": pooling_of(adapters.model)}
    names = label_names(adapters.model) if extras else None
    if names is not None:  # the saved head's classes, so that predictions can be named
        config["id2label"] = {str(i): n for i, n in enumerate(names)}
        config["label2id"] = {n: i for i, n in enumerate(names)}
    blob = json.dumps(config, indent=2).encode()
    return {CONFIG_FILE: blob, WEIGHTS_FILE: {k: v.detach().contiguous().cpu() for k, v in tensors.items()}}


def save_adapter(adapters: AdapterSet, name: str, path: Path, extras: tuple[str, ...] | None) -> Path:
    return write_dir_atomic(path, adapter_files(adapters, name, extras, fold=True))


def write_files_into(folder: Path, files: dict[str, bytes | dict[str, torch.Tensor]]) -> None:
    """Write ``files`` into an existing folder that holds other files too (a Trainer checkpoint),
    each through a temporary sibling and a rename."""
    for file_name, content in files.items():
        write_atomic(Path(folder) / file_name, content if isinstance(content, bytes) else save(content))


def restore_adapter(adapters: AdapterSet, name: str, path: Path) -> None:
    """Copy the tensors saved in ``path`` into the attached adapter ``name`` in place (resuming a
    training run). The file must be of the same method, config, targets and extra modules;
    everything is checked before any tensor is copied."""
    adapter = adapters[name]
    data = read_config(path)
    recorded = (data.get("format"), data.get("method"), data.get("config"), data.get("target_modules"),
                data.get("extras"))
    expected = (FORMAT, adapter.config.method, adapter.config.to_dict(),
                [s.module for s in adapter.sites], list(adapter.extras))
    if recorded != expected:
        raise AdapterLoadError(f"{path} holds another adapter than {name!r} (format, method, config, "
                               "targets or extra modules differ); resume with the same adapter")
    _fill(path, adapter_tensors(adapters, name) | _extra_tensors(adapters.model, adapter.extras), adapter)


def _fill(path: Path, targets: dict[str, torch.Tensor], adapter: Adapter, unread: str | None = None) -> None:
    """Copy the tensors of ``path`` into ``targets`` (key -> tensor sharing a parameter's or a
    buffer's storage) of ``adapter``, all checked first (:func:`read_tensors`,
    :func:`_verify_shared`)."""
    tensors = read_tensors(path, {k: tuple(t.shape) for k, t in targets.items()}, unread)
    _verify_shared(adapter, tensors, path)
    with torch.no_grad():
        for key, t in targets.items():
            t.copy_(tensors[key])


def load_adapter(adapters: AdapterSet, path: Path, name: str | None, with_extras: bool = True) -> str:
    """Attach the adapter saved in ``path`` as ``name`` (default: its recorded name), with its
    extra modules (its head) unless ``with_extras`` is False. Everything is checked before the
    model changes; any problem raises :class:`AdapterLoadError`."""
    from peftlab.methods import method_for
    from peftlab.names import check_name

    data = read_config(path)
    if data.get("format") != FORMAT:
        hint = " (this looks like a peft adapter: use import_peft)" if "peft_type" in data else ""
        raise AdapterLoadError(f"{path} is not a peftlab adapter{hint}")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise AdapterLoadError(f"{path} has format version {clip(repr(version))}; this peftlab reads "
                               f"versions up to {FORMAT_VERSION}: upgrade peftlab")
    try:
        name = check_name(data.get("name") if name is None else name)
        if not isinstance(data.get("method"), str):
            raise ConfigError(f"method must be a method name, got {clip(repr(data.get('method')))}")
        method = method_for(data["method"])
        config = method.config.from_dict(data.get("config"))
    except PeftlabError as e:
        raise AdapterLoadError(f"{path}: {clip(str(e), 500)}") from None
    if name in adapters:
        raise AdapterLoadError(f"an adapter named {name!r} is already attached; pass name=...")
    base = data.get("base_model") if isinstance(data.get("base_model"), dict) else {}
    model_type = getattr(getattr(adapters.model, "config", None), "model_type", None)
    if base.get("model_type") != model_type:
        raise AdapterLoadError(f"{path} was trained on a {clip(repr(base.get('model_type')))} model, "
                               f"this model is {model_type!r}")
    head = data.get("head", {})
    pooling = head.get("pooling", "cls") if isinstance(head, dict) else None
    if pooling != pooling_of(adapters.model):
        raise AdapterLoadError(f"{path} was trained with a {clip(repr(pooling))}-pooling head, this "
                               f"model reads {pooling_of(adapters.model)!r}; load the model with the "
                               "same pooling (peftlab.train.load_model(..., pooling=...))")
    extras = _names(path, data, "extras", "module names")
    names = None
    if "id2label" in data and extras and with_extras and label_names(adapters.model) is not None:
        try:
            names = check_label_names(data["id2label"], str(path / CONFIG_FILE))
        except PeftlabError as e:
            raise AdapterLoadError(clip(str(e), 500)) from None
        if len(names) != len(label_names(adapters.model) or ()):
            raise AdapterLoadError(f"{path} has a head of {len(names)} classes, this model's has "
                                   f"{len(label_names(adapters.model) or ())}; load the model with "
                                   f"num_labels={len(names)}")
    members = _names(path, data, "members", "adapter names")
    missing = [m for m in members if m not in adapters]
    if missing:
        raise AdapterLoadError(f"{path} is a fusion of {str(members)[:200]}; load its members "
                               f"{str(missing)[:200]} before it")
    try:
        built = adapters.build(config, tuple(members))
        extra_tensors = _extra_tensors(adapters.model, extras if with_extras else [])
    # OverflowError, RecursionError: re.compile on absurd target regexes ("a{99999999999}", "((((...")
    except (PeftlabError, AttributeError, OverflowError, RecursionError) as e:
        raise AdapterLoadError(f"{path} does not fit this model: {clip(str(e), 500)}") from None
    recorded = data.get("target_modules")
    if recorded != [s.module for s in built.sites]:
        raise AdapterLoadError(f"{path} targets modules {str(recorded)[:200]}, but on this model "
                               f"its config resolves to {[s.module for s in built.sites][:5]}...")
    # Fill a scratch set of pieces first, so the model is touched only once all is checked.
    _fill(path, _piece_tensors(built) | extra_tensors, built, unread=None if with_extras else EXTRA)
    built.extras = tuple(extras) if with_extras else ()
    adapters.install(name, built)
    if names is not None:  # the head loaded above classifies into these classes
        set_label_names(adapters.model, names)
    return name


def _names(path: Path, data: dict[str, Any], key: str, what: str) -> list[str]:
    """``data[key]`` (none if absent) as a list of names."""
    try:
        return list(check_value(key, data.get(key, []), tuple[str, ...]))
    except ConfigError:
        raise AdapterLoadError(f"{path}: {key} must be a list of {what}") from None
