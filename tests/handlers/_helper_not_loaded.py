raise RuntimeError("files starting with _ are not handler modules and must not be imported")
