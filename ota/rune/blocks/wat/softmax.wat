;; softmax.wat: turns an f32 or f64 tensor into probabilities over all its elements (flattened):
;; exp(x - max) / sum(exp(x - max)), with the maximum subtracted so exp cannot overflow. The
;; output has the input's type and dimensions; exp is computed in f64. No args.

  (data (i32.const 1024) "softmax\00")
  (data (i32.const 1040) "softmax: input must be f32 or f64, not \00")

  (func $fleet_transform (export "fleet_transform") (param $inputs i32) (param $count i32)
                         (result i32)
    (local $r i32) (local $t i32) (local $n i32) (local $src i32) (local $len i32)
    (local $data i32) (local $desc i32) (local $i i32) (local $v f64) (local $max f64)
    (local $sum f64)
    (local.set $r (call $p_expect_one (local.get $inputs) (local.get $count) (i32.const 1024)))
    (if (local.get $r) (then (return (local.get $r))))
    (local.set $t (call $p_type (local.get $inputs)))
    (if (i32.eqz (call $p_is_float (local.get $t)))
      (then
        (call $p_msg_begin)
        (call $p_msg_z (i32.const 1040))
        (call $p_msg_type (local.get $t))
        (return (call $p_msg_fail))))
    (local.set $n (call $p_count (local.get $inputs)))
    (local.set $src (call $p_data (local.get $inputs)))
    (local.set $len (call $p_data_len (local.get $inputs)))
    (local.set $data (call $p_out (local.get $len)))
    (if (i32.eqz (local.get $data)) (then (return (call $p_oom))))
    (local.set $desc (call $p_new_desc (local.get $t) (call $p_rank (local.get $inputs))
                                       (local.get $data) (local.get $len)))
    (if (i32.eqz (local.get $desc)) (then (return (call $p_oom))))
    (call $p_copy_dims (local.get $desc) (local.get $inputs))
    (local.set $max (f64.const -inf))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $v (call $p_load (local.get $t) (local.get $src) (local.get $i)))
        (if (f64.gt (local.get $v) (local.get $max)) (then (local.set $max (local.get $v))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.set $i (i32.const 0))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $sum (f64.add (local.get $sum) (call $p_exp (f64.sub
          (call $p_load (local.get $t) (local.get $src) (local.get $i)) (local.get $max)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.set $i (i32.const 0))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (call $p_store (local.get $t) (local.get $data) (local.get $i)
          (f64.div (call $p_exp (f64.sub (call $p_load (local.get $t) (local.get $src) (local.get $i))
                                         (local.get $max)))
                   (local.get $sum)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $p_ok (local.get $desc) (i32.const 1)))
