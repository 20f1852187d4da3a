"""The rune format: Runefiles, the bundle a build produces, and legacy `.rune` modules."""
