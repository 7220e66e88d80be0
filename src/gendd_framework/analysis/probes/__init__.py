"""Knowledge probes: what a student took from its teacher beyond top-1 agreement (Ojha et al., NeurIPS
2023): where it looks (Grad-CAM), which adversarial images fool it, which invariances it shares, how it
follows the teacher under corruption, and how calibrated it is. One module per probe (pure functions),
`runner` (times them, writes `probe.json`), `cli` (`gendd-probe`) and `stage` (the `probe` stage);
docs/probes.md. Nothing is imported here, so `gendd-probe --help` answers at once.
"""
