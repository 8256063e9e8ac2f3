"""Data: static dataset facts (`datasets`), the TFDS pipelines (`input_pipeline`) and the
offline Fashion-MNIST builder (`fashion_mnist_offline`). Imports nothing from qnet but
`qnet.data` itself.
"""
