"""Mail coming back: DSNs, complaints (ARF), auto-replies, mailto unsubscribes."""
