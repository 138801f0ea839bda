"""siglip-dola: DoLa (Decoding by Contrasting Layers) for SigLIP vision towers."""
__version__ = "0.1.0"
