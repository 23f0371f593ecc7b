"""Report corpora (MIMIC-style English, PadChest-style stemmed Spanish) and a tiny BERT vocabulary."""

from __future__ import annotations

import string

ENGLISH_REPORTS = [
    "FINDINGS: Heart size is normal. Lungs are clear. No pleural effusion or pneumothorax.",
    "IMPRESSION: Mild cardiomegaly. Small left pleural effusion with adjacent atelectasis.",
    "Endotracheal tube terminates 4 cm above the carina. Nasogastric tube in the stomach.",
    "Moderate right pleural effusion, increased since prior study. No focal consolidation.",
    "Bibasilar opacities likely atelectasis, infection not excluded. Stable mediastinum.",
    "Right upper lobe consolidation concerning for pneumonia. Heart size normal.",
    "No acute cardiopulmonary process. Degenerative changes of the thoracic spine.",
    "Small apical pneumothorax on the right. Chest tube in place. No effusion.",
    "Pulmonary vascular congestion and mild interstitial edema. Cardiomegaly is stable.",
    "Left lower lobe opacity may reflect atelectasis or pneumonia. No pneumothorax.",
    "Right internal jugular catheter tip in the mid SVC. Lungs otherwise clear.",
    "Hyperinflated lungs consistent with COPD. No pleural effusion. Normal heart size.",
]

SPANISH_REPORTS = [
    "derram pleural izquierd. cardiomegali. sin neumotorax.",
    "infiltr alveol ambos camp pulmonar predomini derech bibasal. derram pleural bilateral.",
    "cardiomegali. signos de hipertension pulmonar. sin derram pleural.",
    "catet venos central con extrem en vcs. sin neumotorax. cardiomegali leve.",
    "atelectasi laminar basal izquierd. derram pleural izquierd pequeñ.",
    "Neumotórax apical derech. tub de drenaj pleural. sin cambi respect rx previ 11/03/2017.",
    "aument de densid en lobul inferior derech compatibl con neumoni.",
    "sin hallazg patolog. indic cardiotorac normal. senos costofrenic libr.",
    "cambi degener en column dorsal. cardiomegali. derram pleural derech.",
    "nodul pulmonar en lobul superior izquierd. sin derram pleural.",
    "engros hiliar bilateral. redistribu vascular. cardiomegali.",
    "infiltr intersticial bilateral. neumoni atipic. sin neumotorax.",
]

STEMMED_REPORT = "derram pleural izquierd. cardiomegali. sin neumotorax."

TINY_WORDS = [
    "the", "heart", "size", "is", "normal", "no", "pleural", "effusion", "lungs", "are", "clear",
    "left", "right", "small", "mild", "tube", "in", "lobe", "sin", "con", "de", "en",
]


def tiny_vocab() -> dict[str, int]:
    """Special tokens, a few English words, and every letter as a word start and a '##' piece."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *string.digits]
    tokens += list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase + string.digits]
    tokens += TINY_WORDS
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
