"""A support-ticket router: one prompt, one model call, one parser."""
