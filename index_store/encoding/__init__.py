"""The encoding engine: bi- and cross-encoders on a padding-free packed forward (BERT, DistilBERT,
RoBERTa, XLM-R), native kernels per CPU family, precision policy and model files. No Beam import."""
