"""The data path: a registry request's route answered from the store, or fetched upstream once,
verified and stored."""
