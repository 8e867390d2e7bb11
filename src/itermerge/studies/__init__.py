"""The evidence of §4.1 and §4.3: induced rewards (eq. 4), α and λ studies, accuracy matrix, merge vs ensemble."""
