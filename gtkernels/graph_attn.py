"""Fused masked graph attention: node i attends over its in-neighbours only."""
import weakref

import torch

from . import _validate as V
from .graph import Graph
from .graph_union import union_attention

MAX_HEAD_DIM = 256
MAX_WINDOW = 2**31 - 1
# global_nodes tensors already checked: id -> (weakref, (version, num_nodes)), so that a model
# passing the same tensor every step pays the host sync once.
_CHECKED_GLOBALS = {}


def graph_attention(q, k, v, g, *, edge_bias=None, edge_attr=None, scale=None, window=0,
                    dilation=1, global_nodes=None, return_lse=False):
    """Attention of every node over its in-neighbours (edge j -> i), optionally augmented
    with a dilated window over the node order and global nodes, fused, never materialising
    per-edge ``[E, H, D]`` tensors.

    Args:
        q, k, v: float32 / bfloat16 / float16 / float64 ``[N, H, D]``, one dtype and device.
        g: a `Graph` with ``g.num_nodes == N`` on q's device.
        edge_bias: optional ``[E, H]`` of q's dtype, added to the score of each edge
            (-inf drops the edge for that head).
        edge_attr: optional ``[E, H, D]`` of q's dtype, added to k_j and v_j on that edge
            (PyG TransformerConv's ``edge_dim``). Per-edge tensors are in the order of the
            edges the Graph was built from.
        scale: score scale, default ``D ** -0.5``.
        window: int >= 0; with window > 0 node i also attends nodes ``i + t * dilation``
            for ``|t| <= window`` inside ``[0, N)`` (dilation: int >= 1).
        global_nodes: optional int32 / int64 ``[G]`` distinct node ids: they attend every
            node and every node attends them.
        return_lse: also return the log-sum-exp of each node's scores.

    With augmentation (window > 0 or global_nodes given) the keys of node i are the SET
    ``K_i = E_i | W_i | globals`` (all nodes if i is global): each key counts once, and where
    a key is also an edge that edge's edge_bias / edge_attr apply. This needs a coalesced
    graph (``g.coalesce()``); checking it and global_nodes costs one host sync the first time
    (skipped under torch.compile). Extra memory: bool masks ``[N, 2 * window + 1]``,
    ``[N, G]`` and ``[G, N]``, kept while the graph and the global_nodes tensor live.

    Returns:
        out ``[N, H, D]`` of q's dtype, and with ``return_lse`` also lse ``[N, H]`` float32
        (float64 for float64 inputs)::

            s_e   = scale * q_i . (k_j + edge_attr_e) + edge_bias_e      for e = (j -> i)
            out_i = sum_e softmax_e(s) (v_j + edge_attr_e),   lse_i = log sum_e exp(s_e)

        (with augmentation, over K_i, non-edge keys without bias / attr). Duplicate edges
        count as separate terms (without augmentation). A node without keys gets out = 0,
        lse = -inf and zero gradients. Accumulation is in fp32 (fp64 for fp64 inputs); the
        backward is deterministic (no float atomics).

    Example::

        g = gk.Graph.from_edge_index(edge_index, num_nodes=N)        # once per graph
        q, k, v = (torch.randn(N, 4, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = gk.graph_attention(q, k, v, g)                          # [N, 4, 32]
    """
    V.check_int_range("window", window, 0, MAX_WINDOW)
    V.check_int_range("dilation", dilation, 1, MAX_WINDOW)
    _check_inputs(q, k, v, g, edge_bias, edge_attr)
    augmented = window > 0 or global_nodes is not None
    if augmented:
        _check_augmentation(q, g, global_nodes)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if g.edge_perm is not None:
        edge_bias = None if edge_bias is None else edge_bias.index_select(0, g.edge_perm)
        edge_attr = None if edge_attr is None else edge_attr.index_select(0, g.edge_perm)
    if augmented:
        out, lse = union_attention(q, k, v, g, edge_bias, edge_attr, float(scale), window,
                                   dilation, global_nodes)
    else:
        out, lse = torch.ops.gtkernels.graph_attention(
            g.indptr, g.indices, g.csc_indptr, g.csc_indices, g.csc_edge_ids, q, k, v,
            edge_bias, edge_attr, float(scale))
    return (out, lse) if return_lse else out


def _check_augmentation(q, g, global_nodes):
    """global_nodes: 1-D index tensor on g's device, distinct, in [0, N); g coalesced. The
    value checks need a host sync: done eagerly once per tensor (and graph), skipped while
    torch.compile traces."""
    if q.dtype == torch.float64 and q.device.type != "cpu":
        raise TypeError(f"q: float64 with window / global_nodes is supported on CPU only, got "
                        f"it on {q.device}")
    if global_nodes is not None:
        V.check_tensor("global_nodes", global_nodes, dtypes=V.INDEX_DTYPES, dim=1)
        V.check_same_device(global_nodes=global_nodes, graph=g.indptr)
    if torch.compiler.is_compiling():
        return
    if global_nodes is not None:
        _check_global_nodes(global_nodes, g.num_nodes)
    if not g.is_coalesced():
        raise ValueError("g has duplicate edges: window / global_nodes augmentation counts "
                         "each key once and needs a coalesced graph (use g.coalesce())")


def _check_global_nodes(global_nodes, num_nodes):
    """Distinct ids in [0, N): one host sync per tensor (again if modified in place)."""
    stamp = (global_nodes._version, num_nodes)
    entry = _CHECKED_GLOBALS.get(id(global_nodes))
    if entry is not None and entry[0]() is global_nodes and entry[1] == stamp:
        return
    V.check_index_range("global_nodes", global_nodes, num_nodes)
    if torch.unique(global_nodes).numel() != global_nodes.numel():
        raise ValueError("global_nodes must be distinct node ids (it holds duplicates)")
    key = id(global_nodes)
    _CHECKED_GLOBALS[key] = (weakref.ref(global_nodes, lambda _: _CHECKED_GLOBALS.pop(key, None)),
                             stamp)


def _check_inputs(q, k, v, g, edge_bias, edge_attr):
    if not isinstance(g, Graph):
        raise TypeError(f"g must be a gtkernels.Graph, got {type(g).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.check_tensor(name, t, dtypes=V.FLOAT_DTYPES, dim=3)
    V.check_shape("k", k, q.shape, "N, H, D")
    V.check_shape("v", v, q.shape, "N, H, D")
    V.check_same_dtype(q=q, k=k, v=v, edge_bias=edge_bias, edge_attr=edge_attr)
    V.check_same_device(q=q, k=k, v=v, edge_bias=edge_bias, edge_attr=edge_attr,
                        graph=g.indptr)
    n, h, d = q.shape
    if n != g.num_nodes:
        raise ValueError(f"q must be [N, H, D] with N = g.num_nodes = {g.num_nodes}, "
                         f"got {list(q.shape)}")
    V.check_int_range("head dim D", d, 1, MAX_HEAD_DIM)
    if edge_bias is not None:
        V.check_tensor("edge_bias", edge_bias, dim=None)
        V.check_shape("edge_bias", edge_bias, (g.num_edges, h), "E, H")
    if edge_attr is not None:
        V.check_tensor("edge_attr", edge_attr, dim=None)
        V.check_shape("edge_attr", edge_attr, (g.num_edges, h, d), "E, H, D")


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("gtkernels::graph_attention")
def _graph_attention_fake(indptr, indices, csc_indptr, csc_indices, csc_edge_ids, q, k, v,
                          edge_bias, edge_attr, scale):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:2], dtype=_lse_dtype(q))


@torch.library.register_fake("gtkernels::graph_attention_backward")
def _graph_attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, indptr, indices,
                                   csc_indptr, csc_indices, csc_edge_ids, edge_bias, edge_attr,
                                   scale):
    grads = [torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3)]
    d_edge_bias = q.new_empty(edge_bias.shape if edge_bias is not None else (0,))
    d_edge_attr = q.new_empty(edge_attr.shape if edge_attr is not None else (0,))
    return (*grads, d_edge_bias, d_edge_attr)


def _setup_context(ctx, inputs, output):
    (indptr, indices, csc_indptr, csc_indices, csc_edge_ids, q, k, v, edge_bias, edge_attr,
     scale) = inputs
    out, lse = output
    ctx.save_for_backward(indptr, indices, csc_indptr, csc_indices, csc_edge_ids, q, k, v,
                          edge_bias, edge_attr, out, lse)
    ctx.scale = scale
    # An unused output's gradient stays None (the usual lse): no zero tensor is filled for it
    # and the kernels skip its term.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    (indptr, indices, csc_indptr, csc_indices, csc_edge_ids, q, k, v, edge_bias, edge_attr,
     out, lse) = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, d_edge_bias, d_edge_attr = torch.ops.gtkernels.graph_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, indptr, indices, csc_indptr, csc_indices,
        csc_edge_ids, edge_bias, edge_attr, ctx.scale)
    return (None, None, None, None, None, dq, dk, dv,
            d_edge_bias if edge_bias is not None else None,
            d_edge_attr if edge_attr is not None else None, None)


torch.library.register_autograd("gtkernels::graph_attention", _backward,
                                setup_context=_setup_context)


def _register_triton_kernels():
    from .triton import HAS_TRITON

    if not HAS_TRITON:
        return
    from .triton.graph_attn import graph_attention_forward
    from .triton.graph_attn_bwd import graph_attention_backward

    torch.library.register_kernel("gtkernels::graph_attention", "cuda",
                                  lambda *args: graph_attention_forward(*args))
    torch.library.register_kernel("gtkernels::graph_attention_backward", "cuda",
                                  lambda *args: graph_attention_backward(*args))


_register_triton_kernels()
