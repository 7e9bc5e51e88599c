"""From rule to kernel: lowering a traced rule to torch source, assembling one function per plan
(decode, math, encode), compiling it through Inductor and checking it against its eager form."""
