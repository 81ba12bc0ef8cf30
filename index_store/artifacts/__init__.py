"""The artifacts densebeam writes and reads: embeddings dirs, index bundles (manifest, docstore, FAISS
files), their validation, signing, versions and plots. No Beam import."""
