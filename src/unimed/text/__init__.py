"""Cross-lingual text encoder: vocabulary extension and masked-language-model training."""
