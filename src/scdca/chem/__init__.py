"""Chemistry: SMILES handling, fingerprints and similarity, molecule encoders."""
