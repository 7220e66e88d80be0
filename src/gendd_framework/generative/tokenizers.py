"""Split Tokenization (GenDD paper): cut a D-dim feature vector into n = D/k contiguous k-dim tokens.

Each token is an independent diffusion sample conditioned on the same student feature plus a learned
position embedding (which lives in the head, with num_positions = tokenizer.num_tokens). The
`identity` tokenizer keeps the whole vector as one token: the naive, single-token GenDD baseline.
"""

from __future__ import annotations

import torch

from gendd_framework.errors import ConfigError
from gendd_framework.registry import TOKENIZERS


@TOKENIZERS.register("split")
class SplitTokenizer:
    """Contiguous chunks of token_dim channels: (…, D) <-> (…, D/token_dim, token_dim)."""

    def __init__(self, feature_dim: int, token_dim: int = 64) -> None:
        for name, value in (("feature_dim", feature_dim), ("token_dim", token_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"tokenizer: {name} must be a positive integer, got {value!r}")
        if feature_dim % token_dim:
            raise ConfigError(
                f"tokenizer: token_dim={token_dim} does not divide feature_dim={feature_dim} "
                f"({feature_dim} = {feature_dim // token_dim}·{token_dim} + {feature_dim % token_dim}); "
                "pick a token_dim that divides the teacher feature dimension"
            )
        self.feature_dim = feature_dim
        self.token_dim = token_dim
        self.num_tokens = feature_dim // token_dim

    def tokenize(self, features: torch.Tensor) -> torch.Tensor:
        """(…, D) -> (…, n, k); token j holds channels [j·k, (j+1)·k)."""
        if features.shape[-1] != self.feature_dim:
            raise ConfigError(
                f"tokenizer built for feature_dim={self.feature_dim} got features of shape "
                f"{tuple(features.shape)}"
            )
        return features.reshape(*features.shape[:-1], self.num_tokens, self.token_dim)

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """(…, n, k) -> (…, D), the inverse of `tokenize`."""
        if tuple(tokens.shape[-2:]) != (self.num_tokens, self.token_dim):
            raise ConfigError(
                f"detokenize expects (..., {self.num_tokens}, {self.token_dim}), got {tuple(tokens.shape)}"
            )
        return tokens.reshape(*tokens.shape[:-2], self.feature_dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(feature_dim={self.feature_dim}, token_dim={self.token_dim})"


@TOKENIZERS.register("identity")
class IdentityTokenizer(SplitTokenizer):
    """The whole feature vector as a single token (n=1): the naive GenDD baseline."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__(feature_dim, token_dim=feature_dim)

    def __repr__(self) -> str:
        return f"IdentityTokenizer(feature_dim={self.feature_dim})"
