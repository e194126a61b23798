"""Which connections and requests are a registry's, where clients may go, the mirror endpoint,
the parsed route of each registry request, and the account credentials added to pulls."""
