"""Text banks: class names x prompt templates ensembled as open_clip does, label files, .npy/.safetensors, cache.

    bank.py   TextBank [C, D] and its checks (labels, tied or unread classes, fits a model, dataset order)
    files.py  save_text_bank / load_text_bank (.safetensors, .npy) and label files
    build.py  build_text_bank: encode classnames x templates with a model, ensemble, cache

The names below are the public surface (`siglip_dola.text_bank.load_text_bank`, ...); the package's own
modules import from the module that defines a name.
"""
from siglip_dola.text_bank.bank import TextBank
from siglip_dola.text_bank.build import build_text_bank, imagenet_classnames, imagenet_templates
from siglip_dola.text_bank.files import load_text_bank, read_labels_file, save_text_bank

__all__ = ["TextBank", "build_text_bank", "imagenet_classnames", "imagenet_templates", "load_text_bank",
           "read_labels_file", "save_text_bank"]
