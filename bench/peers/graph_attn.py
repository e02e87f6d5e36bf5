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


def edge_tile_bitmap(edge_index, n):
    """The non-empty 128 x 128 tiles of the adjacency (keys q_block * blocks + kv_block, sorted)
    and has_edge(q_idx, kv_idx), an exact lookup in per-tile bitmaps for a mask_mod."""
    blocks = (n + TILE - 1) // TILE
    if blocks * blocks > MAX_TILE_TABLE:
        raise Unsupported(f"tile table of {blocks}^2 entries is too large")
    src, dst = edge_index[0].long(), edge_index[1].long()
    tiles, tile_of_edge = torch.unique((dst // TILE) * blocks + src // TILE, return_inverse=True)
    if tiles.numel() * TILE * TILE > MAX_BITMAP_BYTES:
        raise Unsupported(f"bitmaps of {tiles.numel()} tiles exceed {MAX_BITMAP_BYTES >> 30} GB")
    bitmap = torch.zeros(tiles.numel(), TILE, TILE, dtype=torch.bool, device=src.device)
    bitmap[tile_of_edge, dst % TILE, src % TILE] = True
    tile_id = torch.full((blocks * blocks,), -1, dtype=torch.int32, device=src.device)
    tile_id[tiles] = torch.arange(tiles.numel(), dtype=torch.int32, device=src.device)
    tile_id = tile_id.view(blocks, blocks)

    def has_edge(q_idx, kv_idx):
        tid = tile_id[q_idx // TILE, kv_idx // TILE]
        return (tid >= 0) & bitmap[tid.clamp(min=0), q_idx % TILE, kv_idx % TILE]
    return tiles, has_edge


def tile_block_mask(tiles, n, mask_mod):
    """FlexAttention BlockMask visiting `tiles` (sorted distinct q_block * blocks + kv_block)."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = (n + TILE - 1) // TILE
    q_block, kv_block = tiles // blocks, tiles % blocks  # sorted by (q block, kv block)
    kv_num_blocks = torch.bincount(q_block, minlength=blocks)
    row_start = torch.cumsum(kv_num_blocks, 0) - kv_num_blocks
    rank = torch.arange(tiles.numel(), device=tiles.device) - row_start[q_block]
    # kv_indices must be [q blocks, kv blocks]: BlockMask transposes it for the backward by
    # scattering the ids into a table of its last dim (a narrower table indexes out of bounds).
    kv_indices = torch.zeros(blocks, blocks, dtype=torch.int32, device=tiles.device)
    kv_indices[q_block, rank] = kv_block.to(torch.int32)
    return BlockMask.from_kv_blocks(kv_num_blocks.to(torch.int32)[None, None],
                                    kv_indices[None, None], BLOCK_SIZE=TILE,
                                    mask_mod=mask_mod, seq_lengths=(n, n))


def compiled_flex(q, k, v, block_mask):
    """forward() of compiled flex_attention on [N, H, D] inputs, run forward and backward once:
    a failure here means unsupported."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = torch.compile(flex_attention)

    def forward():
        qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        return attend(qt, kt, vt, block_mask=block_mask)[0].transpose(0, 1)

    try:
        out = forward()
        leaves = [t for t in (q, k, v) if t.requires_grad]
        if leaves:
            torch.autograd.grad(out, leaves, torch.ones_like(out))
    except Exception as exc:
        raise Unsupported(f"FlexAttention failed: {type(exc).__name__}: {str(exc)[:80]}") from exc
    return forward


def flex_tile_bitmap(inputs):
    """FlexAttention: a block mask of the non-empty 128 x 128 tiles and an exact mask_mod
    reading a per-tile bitmap. Duplicate edges count once (a mask is a set)."""
    q, k, v, edge_index = (inputs[n] for n in ("q", "k", "v", "edge_index"))
    if q.device.type != "cuda":
        raise Unsupported("FlexAttention peer runs on CUDA only")
    tiles, has_edge = edge_tile_bitmap(edge_index, q.shape[0])
    mask = tile_block_mask(tiles, q.shape[0], lambda b, h, q_idx, kv_idx: has_edge(q_idx, kv_idx))
    return compiled_flex(q, k, v, mask)


def flex_union(inputs):
    """FlexAttention of graph_attention's union: the adjacency tiles with their bitmaps OR the
    dilated band OR the global nodes (rows and columns), over the tiles any of them touches."""
    q, k, v, edge_index = (inputs[n] for n in ("q", "k", "v", "edge_index"))
    window, dilation, glob = inputs["window"], inputs["dilation"], inputs["global_nodes"]
    if q.device.type != "cuda":
        raise Unsupported("FlexAttention peer runs on CUDA only")
    n = q.shape[0]
    blocks = (n + TILE - 1) // TILE
    edge_tiles, has_edge = edge_tile_bitmap(edge_index, n)
    every = torch.arange(blocks, device=q.device)
    reach = (window * dilation + TILE - 1) // TILE
    band = (every[:, None] + torch.arange(-reach, reach + 1, device=q.device)[None, :])
    band_tiles = (every[:, None] * blocks + band)[(band >= 0) & (band < blocks)]
    glob_blocks = torch.unique(glob // TILE)
    global_tiles = torch.cat([(every[:, None] * blocks + glob_blocks[None, :]).flatten(),
                              (glob_blocks[:, None] * blocks + every[None, :]).flatten()])
    tiles = torch.unique(torch.cat([edge_tiles, band_tiles, global_tiles]))
    is_global = torch.zeros(blocks * TILE, dtype=torch.bool, device=q.device)  # padded rows
    is_global[glob] = True

    def mask_mod(b, h, q_idx, kv_idx):
        diff = kv_idx - q_idx
        in_band = (diff % dilation == 0) & (diff.abs() <= window * dilation)
        return has_edge(q_idx, kv_idx) | in_band | is_global[q_idx] | is_global[kv_idx]

    return compiled_flex(q, k, v, tile_block_mask(tiles, n, mask_mod))


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
