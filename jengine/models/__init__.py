"""Model definitions (pure functions over a params pytree) and weight loading."""
