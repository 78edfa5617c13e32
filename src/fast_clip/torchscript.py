"""The tensors of a TorchScript archive (OpenAI's ``ViT-B-16.pt``), read without running anything in it.

``torch.jit.load`` would execute the archive's code and a plain unpickler would import whatever its pickle names;
``torch.load(weights_only=True)`` refuses TorchScript. A TorchScript archive is a zip of ``data.pkl`` (the module
tree: objects of ``__torch__.*`` classes whose state holds their tensors and submodules), raw tensor storages under
``data/`` and the generated class sources under ``code/``. Here a restricted unpickler rebuilds the tree with inert
placeholder objects, allows exactly the tensor-rebuilding globals, and refuses everything else; the class sources are
only *read* (never executed) for their ``__parameters__`` / ``__buffers__`` lists, so the result is what
``module.state_dict()`` would return.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class TorchScriptError(ValueError):
    pass


class _Obj:
    """Stands in for any ``__torch__`` class: keeps the pickled state, runs nothing."""

    cls = ""

    def __setstate__(self, state):
        self.state = state


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


def is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            # code/__torch__.py holds the classes defined at the top level (a scripted model), code/__torch__/ the rest
            return any(n.endswith("/constants.pkl") for n in z.namelist()) and \
                any("/code/__torch__" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _member_lists(z: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """{qualified class name: parameter and buffer names} from the archive's generated sources (text only)."""
    out: dict[str, set[str]] = {}
    for name in z.namelist():
        if not (name.startswith(prefix + "code/") and name.endswith(".py")):
            continue
        module = name[len(prefix + "code/"):-3].replace("/", ".")
        src = z.read(name).decode("utf-8", errors="replace")
        for m in re.finditer(r"^class (\w+)\(Module\):\n((?:  .*\n)*)", src, flags=re.M):
            body = m.group(2)
            names: set[str] = set()
            for field in ("__parameters__", "__buffers__"):
                f = re.search(rf"^  {field} = \[(.*?)\]", body, flags=re.M)
                if f:
                    names |= set(re.findall(r'"([^"]+)"', f.group(1)))
            out[f"{module}.{m.group(1)}"] = names
    return out


# TorchScript's inert container builders (each returns its argument): scripted modules' pickles name them.
_JIT_BUILDERS = {name: (lambda data, *_: data) for name in (
    "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag")}
# The pickled module tree of even a ViT-L/14 is under 1 MiB; anything near this is not a module tree of tensors.
MAX_PICKLE_BYTES = 64 * 2**20


def read_state_dict(path: str) -> "OrderedDict[str, torch.Tensor]":
    """The parameters and buffers of the TorchScript archive at ``path``, by their module-tree names. Any malformed,
    hostile or inflating archive is one TorchScriptError naming the file."""
    try:
        with zipfile.ZipFile(path) as z:
            root, members = _load_tree(z, path)
    except TorchScriptError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, KeyError, ValueError, TypeError, IndexError,
            AttributeError, RuntimeError, OSError, MemoryError) as e:
        raise TorchScriptError(f"{path}: not a readable TorchScript archive ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if not isinstance(root, _Obj):
        raise TorchScriptError(f"{path}: the archive's root is not a module")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    _collect(root, "", members, out)
    return out


def _load_tree(z: zipfile.ZipFile, path: str):
    """Unpickle data.pkl with inert stand-ins for the module classes; storages are read from ``data/`` only after
    their declared size (numel x element size, and the zip entry's own size) has been checked, so a small archive that
    inflates to gigabytes is refused before it takes the memory."""
    pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1), None)
    if pkl is None:
        raise TorchScriptError(f"{path}: no data.pkl at the archive's top level")
    if z.getinfo(pkl).file_size > MAX_PICKLE_BYTES:
        raise TorchScriptError(f"{path}: data.pkl declares {z.getinfo(pkl).file_size} bytes; a module tree of "
                               f"tensors is far smaller; refused")
    prefix = pkl[: -len("data.pkl")]
    members = _member_lists(z, prefix)
    storages: dict[str, torch.Tensor] = {}

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "__torch__" or module.startswith("__torch__."):  # a scripted model's classes sit at the top
                return type(name, (_Obj,), {"cls": f"{module}.{name}"})
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return torch._utils._rebuild_tensor_v2
            if (module, name) == ("collections", "OrderedDict"):
                return OrderedDict
            if module == "torch" and name in _STORAGE_DTYPES:
                return _StorageType(_STORAGE_DTYPES[name])
            if module == "torch.jit._pickle" and name in _JIT_BUILDERS:
                return _JIT_BUILDERS[name]
            raise TorchScriptError(f"{path}: the archive's pickle names {module}.{name}, which a weights file "
                                   f"has no use for; refused (only module trees of tensors are read)")

        def persistent_load(self, pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType) and isinstance(pid[4], int) and pid[4] >= 0):
                raise TorchScriptError(f"{path}: unexpected persistent id {str(pid)[:200]}")
            _, stype, key, _location, numel = pid
            if key not in storages:
                storages[key] = _read_storage(z, f"{prefix}data/{key}", stype.dtype, numel, path)
            return torch.storage.TypedStorage(wrap_storage=storages[key].untyped_storage(), dtype=stype.dtype,
                                              _internal=True)

    with z.open(pkl) as f:
        return Restricted(f).load(), members


def _read_storage(z: zipfile.ZipFile, name: str, dtype: torch.dtype, numel: int, path: str) -> torch.Tensor:
    want = numel * torch.empty(0, dtype=dtype).element_size()
    info = z.getinfo(name)
    if info.file_size != want:
        raise TorchScriptError(f"{path}: storage {name} declares {info.file_size} bytes, not the {want} of its "
                               f"{numel} values; refused")
    # a deflated entry may inflate far beyond its share of the file: the archive must hold at least a fraction of it
    if info.compress_type != zipfile.ZIP_STORED and want > 16 * max(info.compress_size, 1) + 2**20:
        raise TorchScriptError(f"{path}: storage {name} inflates {info.compress_size} bytes to {want}; a tensor "
                               f"archive does not compress like that; refused")
    raw = bytearray(z.read(name))
    return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _collect(obj: _Obj, prefix: str, members: dict, out: dict) -> None:
    """Tensors of the module tree under ``obj`` that the class sources list as parameters or buffers."""
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        return
    keep = members.get(obj.cls)
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and (keep is None or k in keep):
            out[prefix + k] = v.clone()  # own memory, not the archive buffer
        elif isinstance(v, _Obj):
            _collect(v, f"{prefix}{k}.", members, out)
