"""Privacy: the server's gradient-inversion attack on each method's upload, and client-level DP."""
