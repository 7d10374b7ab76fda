"""`tledge bench`: latency and accuracy of every artefact against the PyTorch model it came from."""
