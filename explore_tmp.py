import torch, time
torch.set_num_threads(1)
from drafters import EagleDrafter, DraftModelDrafter
from drafters.eagle_heads import EagleHead
from tests.tiny_models import peaky_pair, peaky_noisy_pair
from tests.lossless import decode_runs, SETTINGS
target, draft = peaky_noisy_pair()
def noisy(h, noise, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in h.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std().clamp_min(1e-3))
    return h
t0=time.time(); decode_runs(target, DraftModelDrafter(draft, num_speculative_tokens=2), "rejection", SETTINGS["t1.0"], runs=100); print("draft", (time.time()-t0)/100, flush=True)
for v, noise in [("eagle2", 0.2), ("eagle2", 0.3), ("eagle3", 0.6)]:
    h = noisy(EagleHead.for_target(target, v), noise)
    for shape in [dict(num_speculative_tokens=2), dict(tree=[[0], [1], [0, 0], [0, 1], [1, 0]]), dict(tree=[[0], [1], [0, 0], [0, 1], [1, 0]], tree_sampling="with_replacement"), dict(budget=5, num_speculative_tokens=2, top_k_children=2)]:
        for s in ["t1.0", "t0.7_topk3"]:
            t0=time.time()
            counts, stats = decode_runs(target, EagleDrafter(h, **shape), "rejection", SETTINGS[s], runs=100)
            print(v, noise, shape, s, "depth1", round(stats.acceptance_rate_by_depth[0],3), "s/decode", round((time.time()-t0)/100,3), flush=True)
