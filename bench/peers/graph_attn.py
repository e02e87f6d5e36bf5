"""Peers of graph attention (BENCH.md): what a user would pick instead of gk.graph_attention.
Each builder takes the problem's inputs and returns forward() -> out [N, H, D]."""
import torch
import torch.nn.functional as F

from bench.core.registry import Unsupported
from gtkernels.reference.graph_attn import segment_softmax_attention

TILE = 128
MAX_TILE_TABLE = 2**28        # entries of the dense [N/128, N/128] tile-id table
MAX_BITMAP_BYTES = 8 * 2**30  # bool bitmaps of the non-empty 128 x 128 tiles
MAX_DENSE_NODES = 20000


def segment_softmax(inputs):
    """PyG TransformerConv's core in plain torch: gather, segment softmax, scatter-add."""
    q, k, v, edge_index = (inputs[n] for n in ("q", "k", "v", "edge_index"))
    return lambda: segment_softmax_attention(q, k, v, edge_index)


def transformer_conv(inputs):
    """PyG TransformerConv itself, its projections set to identity (x_src = [k | v], x_dst = q)
    and no root weight, so that it computes the same attention."""
    try:
        from torch_geometric.nn import TransformerConv
    except ImportError as exc:
        raise Unsupported("torch_geometric is not installed") from exc
    q, k, v, edge_index = (inputs[n] for n in ("q", "k", "v", "edge_index"))
    n, h, d = q.shape
    conv = TransformerConv((2 * h * d, h * d), d, heads=h, root_weight=False)
    eye = torch.eye(h * d)
    zero = torch.zeros_like(eye)
    with torch.no_grad():
        conv.lin_query.weight.copy_(eye)
        conv.lin_key.weight.copy_(torch.cat([eye, zero], 1))
        conv.lin_value.weight.copy_(torch.cat([zero, eye], 1))
        for lin in (conv.lin_query, conv.lin_key, conv.lin_value):
            lin.bias.zero_()
    conv = conv.to(q.device, q.dtype).requires_grad_(False)

    def forward():
        x_src = torch.cat([k.reshape(n, -1), v.reshape(n, -1)], 1)
        return conv((x_src, q.reshape(n, -1)), edge_index).view(n, h, d)
    return forward


def flex_tile_bitmap(inputs):
    """FlexAttention: a block mask of the non-empty 128 x 128 tiles and an exact mask_mod
    reading a per-tile bitmap. Duplicate edges count once (a mask is a set)."""
    q, k, v, edge_index = (inputs[n] for n in ("q", "k", "v", "edge_index"))
    if q.device.type != "cuda":
        raise Unsupported("FlexAttention peer runs on CUDA only")
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    n, h, d = q.shape
    blocks = (n + TILE - 1) // TILE
    if blocks * blocks > MAX_TILE_TABLE:
        raise Unsupported(f"tile table of {blocks}^2 entries is too large")
    src, dst = edge_index[0].long(), edge_index[1].long()
    tile_key = (dst // TILE) * blocks + src // TILE
    tiles, tile_of_edge = torch.unique(tile_key, return_inverse=True)
    if tiles.numel() * TILE * TILE > MAX_BITMAP_BYTES:
        raise Unsupported(f"bitmaps of {tiles.numel()} tiles exceed {MAX_BITMAP_BYTES >> 30} GB")
    bitmap = torch.zeros(tiles.numel(), TILE, TILE, dtype=torch.bool, device=q.device)
    bitmap[tile_of_edge, dst % TILE, src % TILE] = True
    tile_id = torch.full((blocks * blocks,), -1, dtype=torch.int32, device=q.device)
    tile_id[tiles] = torch.arange(tiles.numel(), dtype=torch.int32, device=q.device)
    tile_id = tile_id.view(blocks, blocks)

    q_block, kv_block = tiles // blocks, tiles % blocks  # tiles sorted by (q block, kv block)
    kv_num_blocks = torch.bincount(q_block, minlength=blocks)
    row_start = torch.cumsum(kv_num_blocks, 0) - kv_num_blocks
    rank = torch.arange(tiles.numel(), device=q.device) - row_start[q_block]
    kv_indices = torch.zeros(blocks, int(kv_num_blocks.max()), dtype=torch.int32,
                             device=q.device)
    kv_indices[q_block, rank] = kv_block.to(torch.int32)

    def mask_mod(b, head, q_idx, kv_idx):
        tid = tile_id[q_idx // TILE, kv_idx // TILE]
        return (tid >= 0) & bitmap[tid.clamp(min=0), q_idx % TILE, kv_idx % TILE]

    block_mask = BlockMask.from_kv_blocks(kv_num_blocks.to(torch.int32)[None, None],
                                          kv_indices[None, None], BLOCK_SIZE=TILE,
                                          mask_mod=mask_mod, seq_lengths=(n, n))
    attend = torch.compile(flex_attention)

    def forward():
        qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        return attend(qt, kt, vt, block_mask=block_mask)[0].transpose(0, 1)

    try:  # compile and run forward and backward once: a failure means unsupported here
        out = forward()
        leaves = [t for t in (q, k, v) if t.requires_grad]
        if leaves:
            torch.autograd.grad(out, leaves, torch.ones_like(out))
    except Exception as exc:
        raise Unsupported(f"FlexAttention failed: {type(exc).__name__}: {str(exc)[:80]}") from exc
    return forward


def dense_sdpa(inputs):
    """Dense SDPA with a boolean [N, N] mask (small N only); rows without keys set to 0.
    Duplicate edges count once (a mask is a set)."""
    q, k, v, edge_index = (inputs[n] for n in ("q", "k", "v", "edge_index"))
    n = q.shape[0]
    if n > MAX_DENSE_NODES:
        raise Unsupported(f"dense mask needs N <= {MAX_DENSE_NODES}, got {n}")
    mask = torch.zeros(n, n, dtype=torch.bool, device=q.device)
    mask[edge_index[1], edge_index[0]] = True
    has_keys = mask.any(1)[:, None, None]

    def forward():
        qt, kt, vt = (t.transpose(0, 1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(0, 1)
        return torch.where(has_keys, out, 0.0)
    return forward


def segment_softmax_attention_fn(edge_index):
    """An ``attention_fn`` for `gtkernels.nn.GraphAttention` (same signature as
    `gtkernels.graph_attention`) that runs the segment-softmax peer over `edge_index`: the
    edges, in construction order, of the Graph the layer is called with (held as a PyG user
    holds them). Swapping it in changes only the attention of a model, not its parameters."""
    def attention(q, k, v, g, *, edge_attr=None, window=0, dilation=1, global_nodes=None):
        if window or global_nodes is not None:
            raise Unsupported("the segment-softmax peer has no window or global nodes")
        if g.num_edges != edge_index.shape[1]:
            raise ValueError(f"edge_index has {edge_index.shape[1]} edges, the Graph "
                             f"{g.num_edges}: not the edges of this Graph")
        return segment_softmax_attention(q, k, v, edge_index, edge_attr=edge_attr)
    return attention
