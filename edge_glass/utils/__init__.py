"""Small shared helpers: errors shown to users, command-line plumbing, atomic writes."""
