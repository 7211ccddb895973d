"""Remote-code modules copied into every exported model folder (they never import bolmo_core)."""
