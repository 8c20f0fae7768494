"""WF gate on the fused Triton kernels, as ``torch.library`` custom ops with autograd (DESIGN §3, §5).

Conv layers run one of two paths chosen per layer shape (``kernels.conv_dispatch``: the committed
table written by ``bench/conv_table.py`` on a GPU; shapes not in it take ``DEFAULT``, the epilogue path):
the fused implicit-GEMM kernels (``kernels.wf_conv``: channels-last, weights packed once per version,
phase-split dgrad with dalpha fused into it) or cuDNN conv + a fused Triton gate epilogue
(``kernels.wf_epilogue``). ``wf_conv2d_triton`` / ``wf_linear_triton`` take the arguments of :mod:`unlearn_fast.reference.wf_gate`
and return the same values. Gradients flow to ``x``, ``alpha_w`` and ``alpha_b`` only: WF freezes the
original layer, so ``weight`` and ``bias`` get no gradient (None) even if they require one; without a bias alpha_b
does not touch the output and gets None, as in the reference. The ops
save the *output* y (not the pre-gate z: the next layer keeps y alive anyway) and recover what
dalpha needs from it (see ``kernels/_common.py``); the alphas are expected inside WF's clip range
[-3, 3]. The custom ops are opaque to ``torch.compile`` (no graph break, registered fake shapes whose
strides match the real outputs: ``torch.library.opcheck`` passes, channels-last included).

Labels are range-checked before any kernel launches (:func:`unlearn_fast.ops.labels.check_labels`, the
same IndexError as the reference); a labels tensor already checked by ``WFModel`` costs no host sync.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from unlearn_fast.kernels import conv_dispatch as _cd
from unlearn_fast.kernels import wf_conv as _kc
from unlearn_fast.kernels import wf_epilogue as _ke
from unlearn_fast.kernels import wf_linear as _kl
from unlearn_fast.ops.labels import check_labels

__all__ = ["wf_conv2d_triton", "wf_linear_triton"]

_IntOrPair = Union[int, Sequence[int]]


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _dev(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _Null()


# ----------------------------------------------------------------------------------------- linear
@torch.library.custom_op("unlearn_fast::wf_linear_fwd", mutates_args=())
def _linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha_w: Tensor, alpha_b: Optional[Tensor],
                labels: Tensor) -> Tensor:
    with _dev(x):
        return _kl.wf_linear_forward(x, weight, bias, alpha_w, alpha_b, labels)


@_linear_fwd.register_fake
def _(x, weight, bias, alpha_w, alpha_b, labels):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("unlearn_fast::wf_linear_bwd", mutates_args=())
def _linear_bwd(dy: Tensor, y: Tensor, weight: Tensor, bias: Optional[Tensor], alpha_w: Tensor,
                alpha_b: Optional[Tensor], labels: Tensor, need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    with _dev(dy):
        dx, daw, dab = _kl.wf_linear_backward(dy.contiguous(), y, weight, bias, alpha_w, alpha_b, labels, need_dx)
    if dx is None:
        dx = dy.new_empty(0)
    return dx, daw.to(alpha_w.dtype), (dab.to(alpha_w.dtype) if dab is not None else alpha_w.new_empty(0))


@_linear_bwd.register_fake
def _(dy, y, weight, bias, alpha_w, alpha_b, labels, need_dx):
    dx = dy.new_empty((*dy.shape[:-1], weight.shape[1])) if need_dx else dy.new_empty(0)
    dab = alpha_w.new_empty(alpha_w.shape) if alpha_b is not None else alpha_w.new_empty(0)
    return dx, alpha_w.new_empty(alpha_w.shape), dab


def _linear_setup(ctx, inputs, output):
    x, weight, bias, alpha_w, alpha_b, labels = inputs
    ctx.save_for_backward(output, weight, bias, alpha_w, alpha_b, labels)
    ctx.need_dx = x.requires_grad


def _linear_backward(ctx, dy):
    y, weight, bias, alpha_w, alpha_b, labels = ctx.saved_tensors
    dx, daw, dab = _linear_bwd(dy, y, weight, bias, alpha_w, alpha_b, labels, ctx.need_dx)
    return (dx if ctx.need_dx else None, None, None, daw, dab if alpha_b is not None and bias is not None else None,
            None)


_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------- conv
def _conv_path(x_shape: list[int], weight: Tensor, stride, padding, dilation) -> str:
    """``"fused"`` or ``"epilogue"`` for this layer geometry (``kernels.conv_dispatch``); forward and
    backward decide alike, so a backward always matches its forward."""
    O, C, KH, KW = weight.shape
    return _cd.choose(C, O, KH, KW, stride, padding, dilation, x_shape[2], x_shape[3])


def _is_cl(t: Tensor) -> bool:
    """The kernels' channels-last rule (``kernels.wf_conv._empty_like_format``)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@torch.library.custom_op("unlearn_fast::wf_conv2d_fwd", mutates_args=())
def _conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha_w: Tensor, alpha_b: Optional[Tensor],
              labels: Tensor, stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    with _dev(x):
        if _conv_path(list(x.shape), weight, stride, padding, dilation) == "epilogue":
            return _ke.wf_conv2d_epilogue_forward(x, weight, bias, alpha_w, alpha_b, labels, stride, padding, dilation)
        return _kc.wf_conv2d_forward(x, weight, bias, alpha_w, alpha_b, labels, stride, padding, dilation)


@_conv_fwd.register_fake
def _(x, weight, bias, alpha_w, alpha_b, labels, stride, padding, dilation):
    Ho = _kc.conv_out_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    Wo = _kc.conv_out_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    out = x.new_empty((x.shape[0], weight.shape[0], Ho, Wo))
    return out.contiguous(memory_format=torch.channels_last) if _is_cl(x) else out


@torch.library.custom_op("unlearn_fast::wf_conv2d_bwd", mutates_args=())
def _conv_bwd(dy: Tensor, y: Tensor, x_shape: list[int], weight: Tensor, bias: Optional[Tensor], alpha_w: Tensor,
              alpha_b: Optional[Tensor], labels: Tensor, stride: list[int], padding: list[int],
              dilation: list[int], need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    cl = _is_cl(y)
    dy = dy.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    with _dev(dy):
        if _conv_path(x_shape, weight, stride, padding, dilation) == "epilogue":
            dx, daw, dab = _ke.wf_conv2d_epilogue_backward(dy, y, tuple(x_shape), weight, bias, alpha_w, alpha_b,
                                                           labels, stride, padding, dilation, 1, need_dx)
        else:
            dx, daw, dab = _kc.wf_conv2d_backward(dy, y, tuple(x_shape), weight, bias, alpha_w, alpha_b, labels,
                                                  stride, padding, dilation, need_dx, channels_last=cl)
    if dx is None:
        dx = dy.new_empty(0)
    return dx, daw.to(alpha_w.dtype), (dab.to(alpha_w.dtype) if dab is not None else alpha_w.new_empty(0))


@_conv_bwd.register_fake
def _(dy, y, x_shape, weight, bias, alpha_w, alpha_b, labels, stride, padding, dilation, need_dx):
    # the real op returns dx in y's memory format (channels-last in, channels-last out)
    fmt = torch.channels_last if _is_cl(y) else torch.contiguous_format
    dx = dy.new_empty(x_shape).contiguous(memory_format=fmt) if need_dx else dy.new_empty(0)
    dab = alpha_w.new_empty(alpha_w.shape) if alpha_b is not None else alpha_w.new_empty(0)
    return dx, alpha_w.new_empty(alpha_w.shape), dab


def _conv_setup(ctx, inputs, output):
    x, weight, bias, alpha_w, alpha_b, labels, stride, padding, dilation = inputs
    # x itself is not needed (weights are frozen): keep only its shape.
    ctx.save_for_backward(output, weight, bias, alpha_w, alpha_b, labels)
    ctx.x_shape = list(x.shape)
    ctx.conv = (stride, padding, dilation)
    ctx.need_dx = x.requires_grad


def _conv_backward(ctx, dy):
    y, weight, bias, alpha_w, alpha_b, labels = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    dx, daw, dab = _conv_bwd(dy, y, ctx.x_shape, weight, bias, alpha_w, alpha_b, labels, stride, padding, dilation,
                             ctx.need_dx)
    return (dx if ctx.need_dx else None, None, None, daw, dab if alpha_b is not None and bias is not None else None,
            None, None, None, None)


_conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


# ------------------------------------------------------------------------------------- public API
def _pair(v: _IntOrPair) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    t = [int(i) for i in v]
    return t * 2 if len(t) == 1 else t


def wf_linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None, alpha_w: Tensor, alpha_b: Tensor | None,
                     labels: Tensor) -> Tensor:
    """Fused gated linear: ``x [B, T, F_in]`` or ``[B, F_in]`` -> ``[..., O]``. Grads for x, alpha_w, alpha_b;
    weight and bias are frozen (no grad). Labels outside ``[0, N_classes)`` raise IndexError."""
    check_labels(labels, x.shape[0], alpha_w.shape[0])
    return _linear_fwd(x, weight, bias, alpha_w, alpha_b, labels)


def wf_conv2d_triton(x: Tensor, weight: Tensor, bias: Tensor | None, alpha_w: Tensor, alpha_b: Tensor | None,
                     labels: Tensor, stride: _IntOrPair = 1, padding: _IntOrPair = 0,
                     dilation: _IntOrPair = 1) -> Tensor:
    """Fused gated conv2d (groups=1): ``x [B, C, H, W]`` -> ``[B, O, Ho, Wo]``. Grads for x, alpha_w,
    alpha_b; weight and bias are frozen (no grad). ``padding`` must be numeric (not 'same')."""
    if isinstance(padding, str):
        raise ValueError("wf_conv2d_triton: string padding ('same'/'valid') is not supported; pass ints")
    check_labels(labels, x.shape[0], alpha_w.shape[0])
    return _conv_fwd(x, weight, bias, alpha_w, alpha_b, labels, _pair(stride), _pair(padding), _pair(dilation))
