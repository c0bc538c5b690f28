"""vLLM server rollouts: starting servers, generating through them, syncing weights."""
