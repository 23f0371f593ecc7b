"""Vision and text encoders, projection heads and the method models."""
