"""What every layer shares: train / eval, the alpha / beta aliases, state_dict with torch's key
names (loaded atomically, never unpickled), and what the last forward saved for backward."""
import os
import threading

import numpy as np


def _layer_dtype(dtype):
    dt = np.dtype(dtype)
    if dt.kind != "f" or dt.itemsize not in (2, 4, 8):
        raise TypeError(f"dtype must be float16, float32 or float64, got {dt}")
    return dt


def _positive_int(value, name):
    """A layer's size argument: a positive int (not a bool), or ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class _Module:
    """What LayerNorm and BatchNorm share: train/eval, alpha/beta, state_dict."""

    _state_names: tuple[str, ...] = ()  # keys of state_dict, in torch's order

    def __init__(self):
        self.training = True
        self._lock = threading.Lock()  # serializes training calls (running stats, saved input)
        self._saved = None
        self.grad_weight = None
        self.grad_bias = None

    def _channels(self, C, affine, bias, track_running_stats):
        """weight (ones) and bias (zeros) of C channels when affine (no bias with bias=False),
        and running_mean (zeros), running_var (ones), num_batches_tracked (0) when tracked;
        None for each one absent (BatchNorm, InstanceNorm)."""
        self.weight = np.ones(C, dtype=self.dtype) if affine else None
        self.bias = np.zeros(C, dtype=self.dtype) if affine and bias else None
        if track_running_stats:
            self.running_mean = np.zeros(C, dtype=self.dtype)
            self.running_var = np.ones(C, dtype=self.dtype)
            self.num_batches_tracked = np.zeros((), dtype=np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def reset_running_stats(self):
        """running_mean to 0, running_var to 1, num_batches_tracked to 0 (when tracked)."""
        if getattr(self, "running_mean", None) is not None:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def alpha(self):
        """The affine scale (new standard deviation): the same array as ``weight``."""
        return self.weight

    @alpha.setter
    def alpha(self, value):
        self.weight = value

    @property
    def beta(self):
        """The affine shift (new mean): the same array as ``bias``."""
        return self.bias

    @beta.setter
    def beta(self, value):
        self.bias = value

    def _state(self):
        return {k: getattr(self, k) for k in self._state_names if getattr(self, k) is not None}

    def state_dict(self):
        """Copies of the parameters and buffers under torch's key names."""
        return {k: np.array(v, copy=True) for k, v in self._state().items()}

    def save_state_dict(self, file):
        """Write ``state_dict()`` to an .npz (``np.savez``); ``load_state_dict(file)`` reads it."""
        np.savez(file, **self.state_dict())

    def load_state_dict(self, state_dict, strict=True):
        """Load arrays under torch's key names (e.g. ``{k: v.numpy() for k, v in sd.items()}``),
        or an .npz file (a path), read with ``allow_pickle=False``: nothing is ever unpickled.

        Every key is checked before anything is written: on any error the layer is unchanged.
        With ``strict=False`` missing and unexpected keys are ignored (shapes are still checked).
        Values must be real numeric arrays (integers for ``num_batches_tracked``).
        """
        if isinstance(state_dict, (str, bytes, os.PathLike)):
            with np.load(state_dict, allow_pickle=False) as data:
                try:
                    arrays = {k: data[k] for k in data.files}
                except ValueError as exc:  # an object array: it would need unpickling
                    raise ValueError(f"{os.fsdecode(state_dict)}: {exc}") from None
            return self.load_state_dict(arrays, strict)
        if not hasattr(state_dict, "items"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        own = self._state()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(
                f"Error(s) in loading state_dict for {type(self).__name__}: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        staged = {}
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            if isinstance(value, np.ndarray) and value.dtype.kind == "O":
                raise TypeError(f"{key}: object arrays are not accepted")
            try:
                arr = np.asarray(value)
            except Exception as exc:
                raise TypeError(f"{key}: not an array: {exc}") from None
            if arr.shape != target.shape:
                raise ValueError(
                    f"size mismatch for {key}: copying a param with shape {arr.shape}, "
                    f"the shape in current model is {target.shape}"
                )
            allowed = "iu" if target.dtype.kind in "iu" else "iuf"
            if arr.dtype.kind not in allowed:
                raise TypeError(f"{key}: expected a {target.dtype} compatible array, got {arr.dtype}")
            staged[key] = arr
        for key, arr in staged.items():
            own[key][...] = arr
        return self

    def __call__(self, x, **kwargs):
        return self.forward(x, **kwargs)

    def _need_saved(self):
        """What the last forward saved for backward.  Every forward replaces it (a failed one
        clears it), so backward always differentiates the last forward, in its own mode."""
        saved = self._saved
        if saved is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() needs a forward pass first (call layer(x), "
                "then layer.backward(grad_out)); the last forward, if any, failed"
            )
        return saved

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_saved"] = None  # the input of the last forward is not part of the layer
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
