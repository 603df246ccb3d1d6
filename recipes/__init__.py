"""The builtin recipes: YAML files shipped inside the package (`distill recipes` lists them), so a
recipe is found by name (`distill run small_sd_v0`) from any directory, not only from a checkout.
`distill.builtin_recipes` resolves names; this package holds only data."""
