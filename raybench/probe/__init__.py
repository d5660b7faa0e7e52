"""`raybench probe`: where in a saved model the image's shape, position and colour stop being
linearly decodable (frozen features, linear probes, trained vs the same net at random init)."""
