"""End to end on CPU: train the head alone on a known conditional Gaussian, then sample it with DDPM.

Data: z ∈ {3 condition vectors}, feature x | z ~ N(A z, diag(s²)) in 8 dims, split into n=2 tokens of
k=4. After a short training (W=128, depth 2) DDPM with 50 steps must recover, per condition and dim,
the mean within 0.1 (≥ 3 std-errors + model error; the condition means differ by ≥ 0.7) and the
standard deviation within a factor [0.8, 1.3] (seeds 0-2 gave 0.95-1.23: short training over-disperses).

Schedule: the LINEAR schedule. With the cosine schedule the last β is clipped to 0.999, so ᾱ_{T−1} is
~2e-9 and the first reverse step multiplies the ε error at t=T−1 by √(ᾱ_prev/ᾱ_{T−1}) ≈ 635 (50 steps);
a CPU-short training cannot reach the ~1e-3 ε precision needed there (that sampler path is covered
with an exact ε oracle in test_generative_samplers.py).
"""

from __future__ import annotations

import torch

from gendd_framework.generative.diffusion import GaussianDiffusion
from gendd_framework.generative.head import MLPAdaLNHead
from gendd_framework.generative.samplers import DDPMSampler
from gendd_framework.generative.tokenizers import SplitTokenizer

CONDS = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.5], [-1.0, -0.5, 0.0]])
A = torch.tensor(
    [[1.0, -0.5, 0.3], [0.2, 1.0, -1.0], [-0.7, 0.4, 0.9], [0.5, 0.5, 0.5],
     [-1.0, 0.0, 0.8], [0.3, -0.9, 0.1], [0.0, 0.6, -0.4], [1.2, 0.2, 0.0]]
)  # fmt: skip
STD = torch.tensor([0.3, 0.35, 0.5, 0.7, 0.4, 0.45, 0.6, 0.8])


def test_head_learns_conditional_gaussian_and_ddpm_recovers_it():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core box: intra-op barriers are far slower than one thread
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        means = CONDS @ A.T  # (3, 8)
        tok = SplitTokenizer(feature_dim=8, token_dim=4)
        head = MLPAdaLNHead(token_dim=4, cond_dim=3, num_positions=tok.num_tokens, width=128, depth=2)
        diffusion = GaussianDiffusion(schedule="linear")
        steps, B, R = 1500, 32, 4
        opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
        for _ in range(steps):
            c = torch.randint(0, 3, (B,), generator=g)
            x = means[c] + STD * torch.randn(B, 8, generator=g)
            x0 = tok.tokenize(x).unsqueeze(0).expand(R, B, tok.num_tokens, 4)  # (R, B, n, k)
            drop = torch.rand(R, B, tok.num_tokens, generator=g) < 0.1  # CFG-style condition dropout
            losses = diffusion.training_losses(head.make_model_fn(CONDS[c], drop=drop), x0, g)
            opt.zero_grad()
            losses["loss"].backward()
            opt.step()
            sched.step()
        assert losses["mse"].item() < 0.5

        head.eval()
        with torch.no_grad():
            tokens = DDPMSampler(steps=50).sample(
                diffusion, head.make_model_fn(CONDS), (1000, 3, tok.num_tokens, 4), generator=g
            )
        feats = tok.detokenize(tokens)  # (samples, conditions, 8)
        assert feats.shape == (1000, 3, 8) and torch.isfinite(feats).all()
        mean_err = (feats.mean(0) - means).abs()
        std_ratio = feats.std(0) / STD
        assert mean_err.max() < 0.1, mean_err
        assert std_ratio.min() > 0.8 and std_ratio.max() < 1.3, std_ratio
    finally:
        torch.set_num_threads(previous)
