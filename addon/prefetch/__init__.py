"""Fetching before anyone asks: the prefetch client, the engines' logins it uses, and the watch
that keeps tags fresh."""
