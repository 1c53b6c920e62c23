"""One module per workflow/rules/<stage>.smk and one function per rule; openers, the job context
and code versions they share.
"""
