"""Training commands of the methods that learn from auxiliary data (see ``detector.train``)."""
