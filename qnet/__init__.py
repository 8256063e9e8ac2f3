"""qnet: training CNNs with low-bitwidth weights and activations (Zhuang et al., TPAMI 2021)."""

__version__ = "0.1.0"
