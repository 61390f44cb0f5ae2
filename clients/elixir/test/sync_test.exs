defmodule SseGateway.SyncTest do
  # Its own module so that it runs beside the async tests (both wait on timeouts).
  use ExUnit.Case, async: true

  alias SseGateway.TestSupport.{FaultProxy, Gateway, Helpers}

  @fast [timeout: 300, connect_timeout: 300, backoff_base: 20, backoff_max: 200]

  setup do
    gw = start_supervised!({Gateway, []})
    %{gw: gw, url: Gateway.url(gw)}
  end

  defp task_numbers(url, topic, n) do
    url
    |> Helpers.raw_events("/topics/#{topic}?last_event_id=0", n, 10_000)
    |> Enum.map(&SseGateway.JSON.decode!(&1.data)["i"])
  end

  @tag :idempotency
  test "synchronous publishes retried through faults are stored once each", %{gw: gw, url: url} do
    proxy = start_supervised!({FaultProxy, Gateway.port(gw)})
    FaultProxy.set_mode(proxy, {:faults, drop: 0.2, delay: 0.2, delay_ms: 600})
    opts = [mode: :sync, url: FaultProxy.url(proxy), retries: 20] ++ @fast

    ids =
      for i <- 1..100, do: elem({:ok, _} = SseGateway.publish("sync:t", :e, %{"i" => i}, opts), 1)

    assert length(Enum.uniq(ids)) == 100
    assert Helpers.counts(url) == %{"sync:t" => 100}
    assert task_numbers(url, "sync:t", 100) == Enum.to_list(1..100)
  end

  describe "a rate-limited gateway (429 with Retry-After)" do
    setup do
      # One publish a second per address, no burst beyond one.
      gw =
        start_supervised!(
          {Gateway,
           [id: :limited, config: "[limits]\npublish_rate_per_ip = 1\npublish_burst = 1\n"]},
          id: :limited
        )

      %{limited: Gateway.url(gw)}
    end

    test "sync mode waits at least Retry-After, then succeeds with the same key", %{limited: url} do
      opts = [mode: :sync, url: url, retries: 3, backoff_base: 10, backoff_max: 5_000]
      assert {:ok, _} = SseGateway.publish("rl:t", :e, %{"i" => 1}, opts)
      {us, result} = :timer.tc(fn -> SseGateway.publish("rl:t", :e, %{"i" => 2}, opts) end)
      assert {:ok, _} = result
      assert us >= 900_000, "retried after #{div(us, 1000)} ms, before Retry-After"

      # With no patience for it (backoff_max below Retry-After), the 429 is returned.
      assert {:error, %SseGateway.Error{status: 429, code: "rate_limited", retry_after: s}} =
               SseGateway.publish("rl:t", :e, %{"i" => 3}, Keyword.put(opts, :backoff_max, 100))

      assert s >= 1
      assert Helpers.counts(url) == %{"rl:t" => 2}
    end

    test "the async buffer honours Retry-After and stores each event once", %{limited: url} do
      name = :"rl_buffer_#{System.unique_integer([:positive])}"

      start_supervised!(
        {SseGateway.Buffer,
         [name: name, url: url, batch_size: 1, backoff_base: 10, backoff_max: 50] ++
           [timeout: 2_000]}
      )

      t0 = System.monotonic_time(:millisecond)

      for i <- 1..3,
          do: :ok = SseGateway.publish("rl:a", :e, %{"i" => i}, mode: :async, buffer: name)

      assert SseGateway.Buffer.flush(name, 10_000) == :ok
      # Three requests at one a second: at least two waits of ~1 s.
      assert System.monotonic_time(:millisecond) - t0 >= 1_800
      assert %{sent: 3, retries: r} = SseGateway.Buffer.stats(name)
      assert r in 2..5, "#{r} retries: Retry-After was not waited for"
      assert task_numbers(url, "rl:a", 3) == [1, 2, 3]
    end
  end
end
