"""Key providers: the file side's one door to a key service.

:mod:`.provider` is the narrow interface the file side imports; the other modules are its
implementations (the embedded envfs store, an envfs key-service daemon) and the choice of
one, made once, at the top (:mod:`.choice`).
"""
