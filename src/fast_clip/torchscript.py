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
            return any(n.endswith("/constants.pkl") for n in z.namelist()) and \
                any("/code/__torch__/" in n for n in z.namelist())
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


def read_state_dict(path: str) -> "OrderedDict[str, torch.Tensor]":
    """The parameters and buffers of the TorchScript archive at ``path``, by their module-tree names."""
    with zipfile.ZipFile(path) as z:
        pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise TorchScriptError(f"{path}: no data.pkl at the archive's top level")
        prefix = pkl[: -len("data.pkl")]
        members = _member_lists(z, prefix)
        storages: dict[str, torch.Tensor] = {}

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if module.startswith("__torch__."):
                    return type(name, (_Obj,), {"cls": f"{module}.{name}"})
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return torch._utils._rebuild_tensor_v2
                if (module, name) == ("collections", "OrderedDict"):
                    return OrderedDict
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _StorageType(_STORAGE_DTYPES[name])
                raise TorchScriptError(f"{path}: the archive's pickle names {module}.{name}, which a weights file "
                                       f"has no use for; refused (only module trees of tensors are read)")

            def persistent_load(self, pid):
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                        and isinstance(pid[1], _StorageType)):
                    raise TorchScriptError(f"{path}: unexpected persistent id {pid!r}")
                _, stype, key, _location, numel = pid
                if key not in storages:
                    raw = bytearray(z.read(f"{prefix}data/{key}"))
                    flat = torch.frombuffer(raw, dtype=stype.dtype) if raw else torch.empty(0, dtype=stype.dtype)
                    if flat.numel() != numel:
                        raise TorchScriptError(f"{path}: storage {key} holds {flat.numel()} values, not {numel}")
                    storages[key] = flat
                return torch.storage.TypedStorage(wrap_storage=storages[key].untyped_storage(), dtype=stype.dtype,
                                                  _internal=True)

        with z.open(pkl) as f:
            root = Restricted(f).load()
    if not isinstance(root, _Obj):
        raise TorchScriptError(f"{path}: the archive's root is not a module")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def walk(obj: _Obj, prefix: str):
        state = getattr(obj, "state", None)
        if not isinstance(state, dict):
            return
        keep = members.get(obj.cls)
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and (keep is None or k in keep):
                out[prefix + k] = v.clone()  # own memory, not the archive buffer
            elif isinstance(v, _Obj):
                walk(v, f"{prefix}{k}.")

    walk(root, "")
    return out
