"""Argument checks of the functional layer. Each error names the argument and what was expected."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name, t, *, dtypes=None, dim=None, min_dim=None):
    """Checks that `t` is a tensor with one of `dtypes` and `dim` dims (or at least `min_dim`)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {list(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {list(t.shape)}")


def check_shape(name, t, expected, symbols):
    """Checks t.shape == expected; `symbols` names the dims, e.g. "E, H" for [E, H]."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must be [{symbols}] = {list(expected)}, got {list(t.shape)}")


def check_same_device(**tensors):
    """Checks that all given tensors (None skipped) share one device."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    if not named:
        return
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on one device")


def check_same_dtype(**tensors):
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "they must match")


def check_int_range(name, value, low, high):
    """Checks low <= value <= high for a Python int option."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def check_choice(name, value, choices):
    """Checks that a string option is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
