"""The `mass-export` command layer, installed as ``mass_export_cli`` (a name that cannot clash in site-packages)."""
