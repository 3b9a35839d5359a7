"""Model families: `primer` (Primer EZ and the Transformer baseline), `feedback`."""
