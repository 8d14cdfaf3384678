"""Edge protection: IP rules, JWT authentication and rate limits, the parts behind the layers."""
