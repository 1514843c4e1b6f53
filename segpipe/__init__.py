"""segpipe: from raw construction-site imagery to trained, evaluated and promoted segmentation models."""
